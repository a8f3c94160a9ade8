"""``lmforge demo``: the whole pipeline on one machine, for either objective.

Causal (default; ``--fim`` adds fill-in-the-middle):

1. tokenizer: byte-level BPE trained on the corpus (with the FIM sentinels under ``--fim``) -> DIR/tokenizer
2. prep: tokenize, pack, write Arrow shards + manifest (FIM rate 0.5 under ``--fim``)     -> DIR/data
3. train: DeepSpeed ZeRO-2 on ``nproc`` local ranks (``pretrain/configs/demo.yaml``)       -> DIR/run
4. export: consolidated Hugging Face folder with model card                                 -> DIR/hf
5. verify: the export reloads it in a fresh process, compares logits, generates -> DIR/verify.json;
   under ``--fim`` the export then infills a middle between a prefix and a suffix (:func:`infill`).

Masked (``--objective mlm``): the same five stages with a WordPiece tokenizer, MLM-framed shards and the
ModernBERT recipe (``pretrain/configs/modernbert.yaml``) shrunk to a demo size (:data:`MLM_DEMO_OVERRIDES`),
trained on English prose that ships with Python (:mod:`lmforge.prose`); the export then answers
``pipeline("fill-mask")`` on :data:`FILL_MASK_SENTENCE`.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from data_prep.errors import UserError
from data_prep.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from data_prep.prep import PrepConfig, prepare
from data_prep.tokenizer.train import TokenizerTrainConfig, train_tokenizer
from launch.local import run_local
from lmforge.prose import write_prose_corpus
from pretrain.config import load_config, to_yaml
from pretrain.export.core import ExportOptions, export
from pretrain.trainer import CHECKPOINT_DIR, preflight, read_summary

log = logging.getLogger("lmforge.demo")

Objective = Literal["clm", "mlm"]
FIM_RATE = 0.5
"""Fraction of documents rearranged for FIM under ``--fim``: Bavarian et al. 2022 find 0.5 costs no left-to-right quality."""
MLM_DEMO_OVERRIDES = [
    # ModernBERT-base shrunk to a demo size: 4 of 22 layers, hidden 256 of 768, the base's GLU ratio (1152 / 768)
    # and head size (64); local windows of 64 tokens, a quarter of the demo's seq_len (the base: 128 of 1024).
    # Measured: 6 layers took 2.1 CPU-seconds per rank per step in fp32 on an AVX2 EPYC (14 min for 400 steps).
    "model.overrides.num_hidden_layers=4", "model.overrides.hidden_size=256", "model.overrides.intermediate_size=384",
    "model.overrides.num_attention_heads=4", "model.overrides.local_attention=64",
    # a few minutes on 2 CPU cores: a tiny model's higher peak lr and the causal demo's steps and batch (the precision:
    # demo_precision()); the rest (30% masking, 15% in validation, document masking, wsd) is the recipe's
    "deepspeed.zero_stage=2", "deepspeed.micro_batch_size=8",
    "deepspeed.gradient_accumulation_steps=1", "max_steps=300", "optim.warmup_steps=30", "optim.lr=2e-3",
    "optim.decay_fraction=0.2", "optim.min_lr_ratio=0.1", "eval_every_steps=0", "log_every_steps=10",
    "data.eval_batches=12",
]
"""Dotted overrides of ``pretrain/configs/modernbert.yaml`` for ``lmforge demo --objective mlm`` (user overrides win)."""
FILL_MASK_SENTENCE = "Return a new {mask} containing the items of the list."
"""The sentence the masked demo's export fills (``{mask}`` is replaced by the tokenizer's mask token)."""
FIM_EXAMPLE = ("def is_even(n):\n    return ", " == 0\n\n\ndef is_odd(n):\n    return not is_even(n)\n")
"""(prefix, suffix) the FIM demo's export infills."""


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""``/proc/cpuinfo`` flags of x86 CPUs that compute bf16 matmuls natively; elsewhere bf16 is emulated. Measured on an
AMD EPYC with AVX2 only (2 ranks, loaded 2-core machine), causal demo: about 28 CPU-seconds per rank per step in bf16
(190 s wall), 2.1 in fp32."""


class DemoError(UserError):
    """Demo options that do not go together."""


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    """Folder for every stage's output."""
    corpus: list[str] = field(default_factory=list)
    """Corpus inputs; empty = the objective's default: ``stdlib`` (the standard library's source, ~31.5 MB) for
    clm, the prose of :mod:`lmforge.prose` (~2 MB, written to ``DIR/corpus``) for mlm."""
    objective: Objective = "clm"
    """``clm`` (causal LM, byte-level BPE) or ``mlm`` (masked LM: WordPiece and the ModernBERT recipe)."""
    fim: bool = False
    """clm only: FIM sentinels in the tokenizer, :data:`FIM_RATE` of documents rearranged, an infill at the end."""
    vocab_size: int = 8192
    """Tokenizer vocabulary, tokens."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation perplexity."""
    nproc: int = 2
    """Data-parallel ranks."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides of the training config (``pretrain/configs/demo.yaml``, or ``modernbert.yaml`` for mlm)."""

    def validate(self) -> None:
        """Raise :class:`DemoError` for options that do not go together."""
        if self.objective not in ("clm", "mlm"):
            raise DemoError(f"demo objective={self.objective!r} (allowed: clm, mlm)")
        if self.fim and self.objective != "clm":
            raise DemoError("demo --fim trains a causal LM; it does not go with --objective mlm")


def demo_precision() -> str:
    """``bf16`` on a GPU or on a CPU with native bf16 (:data:`NATIVE_BF16_CPU_FLAGS`), else ``fp32``.

    The export verification stays bit-exact either way: the probe logits are compared in the training dtype.
    """
    import torch

    if torch.cuda.is_available():
        return "bf16"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no way to tell, and fp32 is never the slow path on a CPU
        return "fp32"
    return "bf16" if flags & set(NATIVE_BF16_CPU_FLAGS) else "fp32"


def config_path(name: str) -> Path:
    """``pretrain/configs/NAME`` of the installed package."""
    return Path(str(resources.files("pretrain") / "configs" / name))


def demo_config_path() -> Path:
    return config_path("demo.yaml")


def run_demo(cfg: DemoConfig) -> dict:
    """Run the five stages; returns the run summary joined with the verification result (plus ``infill`` under
    ``fim``, ``fill_mask_sentence`` and ``fill_mask_demo`` for mlm).

    Raises:
        DemoError: ``fim`` with ``objective`` mlm. Errors of the stages (tokenizer, prep, config, training,
            export verification) propagate.
    """
    cfg.validate()
    out = Path(cfg.output)
    tok_dir, data_dir, run_dir, hf_dir = out / "tokenizer", out / "data", out / "run", out / "hf"
    out.mkdir(parents=True, exist_ok=True)
    corpus = cfg.corpus or _default_corpus(cfg.objective, out)
    family = "wordpiece" if cfg.objective == "mlm" else "byte-bpe"
    log.info("[1/5] tokenizer: %s%s, vocab %d, on %s", family, " with FIM sentinels" if cfg.fim else "",
             cfg.vocab_size, " ".join(corpus))
    train_tokenizer(TokenizerTrainConfig(inputs=list(corpus), output=str(tok_dir), family=family, vocab_size=cfg.vocab_size,
                                         model_max_length=cfg.seq_len, fim=cfg.fim))
    fim_rate = FIM_RATE if cfg.fim else 0.0
    log.info("[2/5] prep: %s, seq_len %d%s -> %s", cfg.objective, cfg.seq_len, f", FIM rate {fim_rate}" if cfg.fim else "",
             data_dir)
    prepare(PrepConfig(inputs=list(corpus), tokenizer=str(tok_dir), output=str(data_dir), seq_len=cfg.seq_len,
                       val_fraction=cfg.val_fraction, objective=cfg.objective, fim_rate=fim_rate, overwrite=True))
    base, preset_overrides = ((config_path("modernbert.yaml"), [f"seq_len={cfg.seq_len}", *MLM_DEMO_OVERRIDES])
                              if cfg.objective == "mlm" else (demo_config_path(), []))
    train_cfg = load_config(base, [f"run_dir={run_dir}", f"data.path={data_dir}", f"data.tokenizer={tok_dir}",
                                   *preset_overrides, f"deepspeed.precision={demo_precision()}", *cfg.overrides])
    preflight(train_cfg)  # refuse here, once, before any rank starts
    shutil.rmtree(run_dir, ignore_errors=True)
    config_file = out / "train.yaml"
    config_file.write_text(to_yaml(train_cfg))
    log.info("[3/5] train: %s, %d ranks, ZeRO stage %d, %s -> %s", train_cfg.model.preset, cfg.nproc,
             train_cfg.deepspeed.zero_stage, train_cfg.deepspeed.precision, run_dir)
    run_local([sys.executable, "-m", "lmforge", "train", str(config_file)], cfg.nproc)
    summary = read_summary(run_dir)
    log.info("[4/5] export -> %s, then [5/5] its verification in a fresh process", hf_dir)
    record = export(run_dir / CHECKPOINT_DIR / summary["checkpoint_tag"], hf_dir, ExportOptions(overwrite=True))
    verification = record["verification"]
    (out / "verify.json").write_text(json.dumps(verification, indent=2))
    result = {**summary, **verification}
    log.info("[5/5] verified: logits within %.3g of the trained model's (%s)", verification["max_abs_logit_diff"],
             verification["pipeline"])
    log.info("validation perplexity: %.2f at start -> %.2f at end (%d steps, %d tokens, %.0f tokens/s)",
             summary["val_ppl_start"], summary["val_ppl_end"], summary["steps"], summary["tokens"], summary["tokens_per_s"])
    if "val_bpb_end" in summary:  # causal LMs: comparable across tokenizers
        log.info("validation bits per byte: %.4f at start -> %.4f at end", summary["val_bpb_start"], summary["val_bpb_end"])
    if cfg.objective == "mlm":
        result.update(_show_fill_mask(hf_dir))
    elif cfg.fim:
        result.update(_show_infill(hf_dir))
    else:
        log.info("generated %r -> %r", verification["prompt"], verification["continuation"])
    return result


def _default_corpus(objective: Objective, out: Path) -> list[str]:
    if objective == "clm":
        return ["stdlib"]
    path = out / "corpus" / "prose.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = write_prose_corpus(path)
    log.info("[0/5] corpus: %d documents, %.1f MB of Python's help topics and stdlib docstrings -> %s",
             stats["documents"], stats["text_bytes"] / 1e6, path)
    return [str(path)]


def fill_mask(hf_dir: str | Path, sentence: str = FILL_MASK_SENTENCE, top_k: int = 5) -> tuple[str, list[dict]]:
    """``sentence`` with its ``{mask}`` replaced by the tokenizer's mask token, and the ``top_k`` answers of
    ``pipeline("fill-mask")`` on the folder ``hf_dir`` (``token_str``, ``score`` in [0, 1])."""
    from transformers import pipeline

    pipe = pipeline("fill-mask", model=str(hf_dir), tokenizer=str(hf_dir))
    assert pipe.tokenizer is not None  # the folder holds one: the export verified it
    text = sentence.format(mask=pipe.tokenizer.mask_token)
    return text, [{"token_str": r["token_str"], "score": float(r["score"])} for r in pipe(text, top_k=top_k)]


def _show_fill_mask(hf_dir: Path) -> dict:
    text, answers = fill_mask(hf_dir)
    print(f"fill-mask: {text}")
    for a in answers:
        print(f"  {a['token_str']!r:>14}  {a['score']:.3f}")
    return {"fill_mask_sentence": text, "fill_mask_demo": answers}


def infill(hf_dir: str | Path, prefix: str, suffix: str, max_new_tokens: int = 24) -> str:
    """The middle a FIM-trained causal LM writes between ``prefix`` and ``suffix``: greedy ``generate`` on the
    PSM prompt ``<fim_prefix>`` prefix ``<fim_suffix>`` suffix ``<fim_middle>`` (data_prep.fim), up to
    ``max_new_tokens`` tokens or EOS, decoded without special tokens.

    Raises:
        DemoError: the folder's tokenizer lacks the FIM sentinels (trained without ``--fim``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    missing = [t for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise DemoError(f"{hf_dir}: tokenizer has no {', '.join(missing)} (train it with --fim)")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    enc = tok(f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return str(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))


def _show_infill(hf_dir: Path) -> dict:
    prefix, suffix = FIM_EXAMPLE
    middle = infill(hf_dir, prefix, suffix)
    print(f"infill: prefix {prefix!r}\n        suffix {suffix!r}\n        middle {middle!r}")
    return {"infill": {"prefix": prefix, "suffix": suffix, "middle": middle}}
