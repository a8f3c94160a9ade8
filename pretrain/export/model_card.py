"""The model card (``README.md``) of an export: Hub YAML metadata and a body written from the run's records.

Metadata follows the Hub's model card spec (https://huggingface.co/docs/hub/model-cards), built with
``huggingface_hub.ModelCardData`` and checked by parsing the written text back with
``huggingface_hub.ModelCard`` (:func:`validate_card`; ``ModelCard.validate`` itself needs the Hub).
Every number in the body comes from the checkpoint state, the training config, the data manifest,
the tokenizer and ``metrics.jsonl``; nothing is typed in by hand.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.encode import TRAIN
from pretrain.errors import ExportError
from pretrain.export.run_info import RunInfo, training_wall_s

log = logging.getLogger(__name__)

LOSS_CURVE_FILE = "loss_curve.png"
PIPELINE_TAGS = {"clm": "text-generation", "mlm": "fill-mask"}
AUTO_CLASSES = {"clm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM"}
REQUIRED_METADATA = ("library_name", "license", "language", "tags", "datasets", "pipeline_tag")


@dataclass
class CardOptions:
    license: str = "other"
    """Hub license id (``apache-2.0``, ``mit``, ``other``, ...)."""
    language: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes of the training text (``code`` for source code)."""
    datasets: list[str] = field(default_factory=list)
    """Hub dataset ids of the training data; default: the prepared data folder's name."""
    model_name: str = ""
    """Name in ``model-index``; default: the repo id, else the export folder's name."""
    repo_id: str = ""
    """Where the export is pushed, for the loading snippet; empty = a local path."""


def _fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "not recorded"
    if s < 60:
        return f"{s:.1f} s"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def latest_validation(info: RunInfo) -> dict | None:
    """The last validation record at or before the checkpoint's step (``step``, ``val_loss``, ``val_ppl``)."""
    return info.val_records[-1] if info.val_records else None


def card_metadata(info: RunInfo, options: CardOptions, export_name: str, harness=None):
    """``huggingface_hub.ModelCardData`` of the export; model-index holds the validation perplexity and, with
    ``harness`` (a :class:`~pretrain.export.harness.HarnessResult`), each lm-evaluation-harness metric."""
    from huggingface_hub import EvalResult, ModelCardData

    pipeline_tag = PIPELINE_TAGS[info.objective]
    data_name = Path(info.config["data"]["path"]).name
    val = latest_validation(info)
    results = []
    if val is not None and val.get("val_ppl") is not None and math.isfinite(val["val_ppl"]):
        results.append(EvalResult(task_type=pipeline_tag, dataset_type="lmforge-prepared", dataset_name=f"{data_name} (held out)",
                                  dataset_split="validation", metric_type="perplexity", metric_value=round(val["val_ppl"], 4),
                                  metric_name=f"validation perplexity (step {val['step']})"))
    results += harness_results(harness, pipeline_tag) if harness is not None else []
    ds = info.config["deepspeed"]
    return ModelCardData(
        library_name="transformers", license=options.license, language=list(options.language),
        datasets=list(options.datasets) or [data_name], pipeline_tag=pipeline_tag,
        tags=["lmforge", "pretrained-from-scratch", "causal-lm" if info.objective == "clm" else "masked-lm",
              info.model_config.get("model_type", "unknown"), f"zero-stage-{ds['zero_stage']}"],
        model_name=options.model_name or options.repo_id or export_name, eval_results=results or None)


def harness_results(harness, pipeline_tag: str) -> list:
    """One ``EvalResult`` per task and metric of an lm-eval run (standard errors left out), named with the
    harness version and the document limit, as the Hub's model-index expects."""
    from huggingface_hub import EvalResult

    limit = f", first {harness.limit} documents" if harness.limit else ""
    return [EvalResult(task_type=pipeline_tag, dataset_type=task, dataset_name=task, metric_type=name,
                       metric_value=round(value, 4), metric_name=f"{name} (lm-eval {harness.lm_eval_version}{limit})",
                       source_name="lm-evaluation-harness", source_url="https://github.com/EleutherAI/lm-evaluation-harness")
            for task, metrics in sorted(harness.tasks.items()) for name, value in sorted(metrics.items())
            if not name.endswith("_stderr")]


def _architecture(info: RunInfo, n_params: int) -> list[str]:
    mc = info.model_config
    arch = (mc.get("architectures") or [mc.get("model_type")])[0]
    dims = [f"{key.replace('_', ' ')} {mc[key]}" for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "intermediate_size", "n_embd",
                                                           "n_layer", "n_head") if mc.get(key) is not None]
    positions = mc.get("max_position_embeddings") or mc.get("n_positions")
    return [f"- {arch} (`{mc.get('model_type')}`, preset `{info.config['model']['preset']}`): "
            f"{_fmt_count(n_params)} parameters ({n_params:,})",
            f"- {', '.join(dims)}", f"- vocabulary {mc.get('vocab_size')} embedding rows, up to {positions} positions"]


def _data(info: RunInfo) -> list[str]:
    m = info.manifest
    c, splits = m.get("counts"), m.get("splits", {})
    sources = m.get("sources", [])
    if isinstance(sources, dict):
        src = f"{sources.get('files')} files ({sources.get('first')} ... {sources.get('last')})"
    else:
        shown = ", ".join(f"`{s}`" for s in sources[:8])
        src = shown + (f" and {len(sources) - 8} more" if len(sources) > 8 else "")
    blend = m.get("blend")
    mixing = ("; ".join(f"`{b['path']}` weight {b['weight']:.3f}" for b in blend) if blend
              else "one prepared dataset, weight 1.0 (no blend)")
    size = (f"- {c['documents']:,} documents, {c['tokens']:,} tokens in {c['sequences']:,} packed sequences of "
            f"{m['seq_len']} tokens ({c.get('rejects', 0):,} records rejected)" if c
            else f"- a raw corpus streamed and tokenized during training into {m['seq_len']}-token sequences (no prep counts)")
    lines = [f"- sources: {src}", size, f"- mixing weights: {mixing}", *_mixture(info)]
    if splits:
        lines.append("- splits: " + ", ".join(f"{name} {s.get('tokens', 0):,} tokens / {s.get('documents', 0):,} documents"
                                              for name, s in splits.items()))
    return lines


def _mixture(info: RunInfo) -> list[str]:
    """The effective mixture over the checkpoint's consumed samples: per dataset, sequences read, token positions
    (sequences x seq_len) and passes over it (epochs), after ``max_epochs`` caps and ``blend_schedule``
    (data_prep.mixture: the trainer's own order, recomputed from the manifest's sizes and the config)."""
    from data_prep.mixture import MixtureOrder
    from pretrain.sources import schedule_samples

    m, cfg, st = info.manifest, info.config, info.state
    consumed, seq_len = int(st.get("consumed_samples", 0)), int(m["seq_len"])
    blend = cfg["data"].get("blend") or []
    if not m.get("blend") or not blend:
        train = (m.get("splits", {}).get(TRAIN) or {}).get("sequences")
        if not train:
            return []
        return [f"- trained on: {consumed:,} sequences = {consumed * seq_len:,} tokens, {consumed / train:.2f} epochs of the data"]
    ds = cfg["deepspeed"]
    global_batch = ds["micro_batch_size"] * ds["gradient_accumulation_steps"] * int(st.get("world_size", 1))
    schedule = schedule_samples(cfg["data"], global_batch)
    phases = schedule if schedule and schedule[0][0] == 0 else [(0, [b["weight"] for b in blend]), *schedule]
    lengths = [b["sequences"] for b in m["blend"]]
    order = MixtureOrder(lengths, phases, [b.get("max_epochs", 0.0) for b in blend], int(cfg.get("seed", 0)))
    counts = order.counts(consumed)
    lines = [f"- effective mixture over the {consumed:,} sequences trained on"
             + (f" ({len(schedule)} scheduled weight changes)" if schedule else "") + ":"]
    for b, n, size in zip(blend, counts.tolist(), lengths):
        cap = f", capped at {b['max_epochs']} epochs" if b.get("max_epochs") else ""
        lines.append(f"  - `{b['path']}`: {n:,} sequences = {n * seq_len:,} tokens ({n / max(1, consumed):.1%}), "
                     f"{n / size:.2f} epochs of its {size:,} sequences{cap}")
    return lines


def _training(info: RunInfo, zero_stage: int) -> list[str]:
    cfg, st = info.config, info.state
    ds, opt = cfg["deepspeed"], cfg["optim"]
    world = int(st.get("world_size", 1))
    global_batch = ds["micro_batch_size"] * ds["gradient_accumulation_steps"] * world
    seq_len = info.manifest["seq_len"]
    schedule = f"{opt['schedule']}, peak lr {opt['lr']}, {opt['warmup_steps']} warmup steps"
    if opt["schedule"] in ("cosine", "wsd"):
        schedule += f", final lr {opt['min_lr_ratio']} x peak"
    if opt["schedule"] == "wsd":
        schedule += f", decay over the last {opt['decay_fraction']:.0%} of steps"
    mfu = [r["mfu"] for r in info.train_records if r.get("mfu") is not None]
    mfu_text = (f"{sum(mfu) / len(mfu):.1%} mean over logged steps" if mfu
                else "not measured (no peak FLOP/s known for the device, e.g. CPU)")
    return [f"- tokens seen: {int(st['tokens']):,} in {int(st['step']):,} optimizer steps of {cfg.get('max_steps', '?')} planned",
            f"- global batch: {global_batch} sequences = {global_batch * seq_len:,} tokens (micro batch "
            f"{ds['micro_batch_size']} x gradient accumulation {ds['gradient_accumulation_steps']} x {world} data-parallel ranks)",
            f"- optimizer: AdamW, betas {opt['betas']}, weight decay {opt['weight_decay']}, gradient clipping {opt['grad_clip']}",
            f"- schedule: {schedule}",
            f"- precision: {ds['precision']}; DeepSpeed ZeRO stage {zero_stage}",
            f"- hardware: {st.get('hardware') or f'{world} data-parallel ranks (device not recorded)'}",
            f"- training wall time: {_fmt_seconds(training_wall_s(info.train_records))} (sum of logged intervals)",
            f"- MFU: {mfu_text}",
            f"- loss-spike rollbacks: {int(st.get('rollbacks', 0))} ({int(st.get('skipped_samples', 0)):,} sequences skipped)"]


def _evaluation(info: RunInfo, verification: dict | None) -> list[str]:
    bpb = any("val_bpb" in r for r in info.val_records)
    lines = ["| step | validation loss (nats/token) | perplexity |" + (" bits per byte |" if bpb else ""),
             "|---|---|---|" + ("---|" if bpb else "")]
    shown = info.val_records if len(info.val_records) <= 12 else info.val_records[:1] + info.val_records[-11:]
    lines += [f"| {r['step']} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |" + (f" {r['val_bpb']:.4f} |" if bpb else "")
              for r in shown]
    if not info.val_records:
        lines = ["No validation record in metrics.jsonl up to this step."]
    elif bpb:
        lines.append("\nBits per byte: the validation loss in bits per UTF-8 byte of the held-out text (loss / ln 2 x "
                     "tokens / bytes of the split), comparable across tokenizers (The Pile, Gao et al. 2020).")
    elif info.objective == "mlm":
        lines.append("\nNo bits per byte for a masked LM: its loss covers only the masked tokens, so loss per byte of "
                     "text is not a compression rate and does not compare with a causal LM's.")
    if verification and verification.get("max_abs_logit_diff") is not None:
        same = ("bit-identical to" if verification.get("exact") and verification["max_abs_logit_diff"] == 0
                else f"within {verification['max_abs_logit_diff']:.3g} of")
        lines.append(f"\nExport check: reloaded with transformers, logits on the probe batch {same} the training "
                     f"engine's ({verification['precision']}).")
    return lines


def _usage(info: RunInfo, options: CardOptions, export_name: str) -> list[str]:
    where = options.repo_id or f"path/to/{export_name}"
    task = PIPELINE_TAGS[info.objective]
    example = '"def fibonacci(n):"' if info.objective == "clm" else 'f"The capital of France is {pipe.tokenizer.mask_token}."'
    return ["```python", "import torch",
            f"from transformers import {AUTO_CLASSES[info.objective]}, AutoTokenizer, pipeline", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            f'model = {AUTO_CLASSES[info.objective]}.from_pretrained("{where}", dtype=torch.{_dtype(info)})',
            f'pipe = pipeline("{task}", model=model, tokenizer=tokenizer)', f"print(pipe({example}))", "```",
            *(_infill_usage() if info.objective == "clm" and has_fim_tokens(info.tokenizer_dir) else [])]


def has_fim_tokens(tokenizer_dir: Path) -> bool:
    """Whether the tokenizer maps each fill-in-the-middle sentinel (``data_prep.fim.FIM_REQUIRED``) to one id."""
    from tokenizers import Tokenizer

    from data_prep.fim import FIM_REQUIRED
    from data_prep.tokenizer.folder import TOKENIZER_FILE

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / TOKENIZER_FILE))
    return all(tok.token_to_id(t) is not None for t in FIM_REQUIRED)


def _infill_usage() -> list[str]:
    """Infilling with the loaded model: the PSM prompt the FIM documents were trained on (data_prep.fim)."""
    from data_prep.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

    prompt = f'"{FIM_PREFIX}def is_even(n):\\n    return {FIM_SUFFIX} == 0\\n{FIM_MIDDLE}"'
    return ["", "Fill in the middle: the tokenizer has the FIM sentinels and the model was trained on documents "
                "rearranged as prefix-suffix-middle (Bavarian et al. 2022), so it writes the middle between a prefix and a suffix:",
            "", "```python", f"prompt = {prompt}",
            'inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)',
            "out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)",
            'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```"]


def _dtype(info: RunInfo) -> str:
    from pretrain.export.verify import PRECISION_DTYPES

    return PRECISION_DTYPES[info.config["deepspeed"]["precision"]]


def card_body(info: RunInfo, n_params: int, zero_stage: int, options: CardOptions, export_name: str,
              has_curve: bool, verification: dict | None = None, harness=None) -> str:
    """The Markdown body of the card (everything after the YAML front matter)."""
    tok = info.tokenizer
    kind = "causal (next-token)" if info.objective == "clm" else "masked"
    data_name = Path(info.config["data"]["path"]).name
    parts = [f"# {options.model_name or options.repo_id or export_name}", "",
             f"A {kind} language model pretrained from scratch with lmforge on `{data_name}` "
             f"(checkpoint `{info.tag_dir.name}`, step {info.step:,}).", "",
             "## Model", *_architecture(info, n_params), "",
             "## Tokenizer", f"- family: {tok['family']}", f"- vocabulary: {tok['vocab_size']:,} tokens",
             f"- fingerprint (sha256 of tokenizer.json): `{tok['fingerprint']}`", "",
             "## Training data", *_data(info), "",
             "## Training", *_training(info, zero_stage), "",
             "## Evaluation", *_evaluation(info, verification), *_harness_lines(harness), ""]
    if has_curve:
        parts += [f"![training and validation loss]({LOSS_CURVE_FILE})", ""]
    parts += ["## Intended use and limitations",
              f"A research artifact: a base model of {_fmt_count(n_params)} parameters trained on "
              f"{_fmt_count(int(info.state['tokens']))} tokens of the data above, for studying pretraining and as a starting "
              "point for fine-tuning. It is not instruction-tuned, was not evaluated for safety, bias or factual accuracy, "
              "and reproduces the style and the errors of its training data; it knows nothing outside it. "
              "Do not use it for decisions about people or where wrong output causes harm.", "",
              "## How to load", *_usage(info, options, export_name), ""]
    return "\n".join(parts)


def _harness_lines(harness) -> list[str]:
    if harness is None:
        return []
    s = harness.settings
    lines = ["", f"lm-evaluation-harness {harness.lm_eval_version} (backend `{s.get('model')}`, dtype {s.get('dtype')}, "
                 f"batch size {s.get('batch_size')}, {s.get('device')}"
                 + (f", first {harness.limit} documents per task" if harness.limit else "") + "):", "",
             "| task | metric | value | stderr | documents |", "|---|---|---|---|---|"]
    for task, metrics in sorted(harness.tasks.items()):
        for name, value in sorted(metrics.items()):
            if not name.endswith("_stderr"):
                err = metrics.get(f"{name}_stderr")
                lines.append(f"| {task} | {name} | {value:.4f} | {'' if err is None else f'{err:.4f}'} | "
                             f"{harness.samples.get(task, '')} |")
    return lines


def plot_loss_curve(info: RunInfo, path: Path) -> bool:
    """Training loss (and validation loss) against tokens seen, as a PNG; False when there is nothing to plot.

    Uses matplotlib's object API with the Agg canvas (no pyplot): safe off the main thread.
    """
    if not info.train_records:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r.get("tokens", r["step"]) for r in info.train_records], [r["loss"] for r in info.train_records],
            label="training loss", linewidth=1.2)
    val = [r for r in info.val_records if r.get("val_loss") is not None]
    if val:
        tokens_at = {r["step"]: r.get("tokens") for r in info.train_records}
        per_step = int(info.state["tokens"]) / max(info.step, 1)
        ax.plot([tokens_at.get(r["step"]) or r["step"] * per_step for r in val], [r["val_loss"] for r in val],
                "o-", label="validation loss", markersize=4)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{info.config['model']['preset']}: loss up to step {info.step}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def render_card(info: RunInfo, n_params: int, zero_stage: int, options: CardOptions, export_name: str,
                has_curve: bool, verification: dict | None = None, harness=None) -> str:
    """The full ``README.md``: YAML front matter and body, validated with :func:`validate_card`."""
    meta = card_metadata(info, options, export_name, harness)
    text = (f"---\n{meta.to_yaml()}\n---\n\n"
            + card_body(info, n_params, zero_stage, options, export_name, has_curve, verification, harness))
    validate_card(text, "README.md")
    return text


def validate_card(text: str, where: str = "README.md"):
    """Parse ``text`` with ``huggingface_hub.ModelCard`` and check the metadata lmforge promises.

    Returns the ModelCard. Raises:
        ExportError: unparsable YAML or model-index, a required field missing or empty, no
            perplexity in model-index, or an empty body.
    """
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text)
    except ValueError as exc:
        raise ExportError(f"{where}: model card metadata does not parse: {str(exc).splitlines()[0]}") from exc
    data = card.data.to_dict()
    missing = [k for k in REQUIRED_METADATA if not data.get(k)]
    if missing:
        raise ExportError(f"{where}: model card metadata lacks {', '.join(missing)}")
    if not any(r.metric_type == "perplexity" for r in getattr(card.data, "eval_results", None) or []):
        log.warning("%s: no validation perplexity in model-index (no validation record up to this step)", where)
    if not card.text.strip():
        raise ExportError(f"{where}: model card has no body")
    return card
