"""The masked-LM train step: lmforge against the ``run_mlm.py`` recipe (HF ``Trainer`` + DeepSpeed +
``DataCollatorForLanguageModeling``) on the same prepared sequences, CPU, 2 data-parallel ranks. Unit: tokens/s,
all ranks together.

Both sides train one resolved config (written once with ``pretrain.config.to_yaml``): ``lmforge demo
--objective mlm``'s recipe, i.e. ``pretrain/configs/modernbert.yaml`` with ``lmforge.demo.MLM_DEMO_OVERRIDES``
(ModernBERT shrunk to 4 layers, hidden 256, local windows of 64 tokens; ZeRO-2, micro batch 8, gradient
accumulation 1, AdamW lr 2e-3, wsd schedule, ``mlm.probability`` 0.3 with 80/10/10 replacement), bf16,
``seq_len=512`` and ``data.document_masking=false`` (the ``run_mlm.py`` recipe attends across the packed
documents; lmforge then feeds the same inputs: ``input_ids``, ``labels`` and an all-ones attention mask). The
data: the English prose that ships with Python (``lmforge.prose``, ~2 MB), a WordPiece tokenizer of 8192 tokens
(``lmforge tokenizer train --family wordpiece``) and ``lmforge prep --objective mlm --seq-len 512``, built once
under ``bench/.cache/mlm-prose-v8192-s512``.

- lmforge: ``lmforge launch local --nproc 2``; its masking is ``pretrain.inputs.MaskedLMInputs`` (which runs
  transformers' ``DataCollatorForLanguageModeling`` on each micro batch); tokens/s from ``metrics.jsonl``.
- peer: ``Trainer(model, TrainingArguments(deepspeed=<lmforge's generated ds_config>, optim="adamw_torch_fused",
  bf16=True, ...), train_dataset=<the shards' input_ids>, data_collator=DataCollatorForLanguageModeling(tokenizer,
  mlm_probability=0.3, mask_replace_prob=0.8, random_replace_prob=0.1))`` with the model built by the same
  code and seed (``bench/train_peers.py``, worker ``trainer-mlm``). The loss is the model's own on both sides
  (lmforge's fused loss is for causal LMs only).

Steady state: the first 4 steps are left out. Usage: ``python bench/bench_train_mlm.py [--repeats 3] [--steps 12]``;
writes ``bench/results/bench_train_mlm.json``: 6 runs of 60-150 s, 10 minutes in all on the shared 2-core machine
at a load average of 4-5 (2026-12-03), plus about a minute to build the data once.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import common
import train_peers
from train_peers import MALLOC_NOTE, NPROC, SKIP_STEPS

SEQ_LEN = 512
VOCAB_SIZE = 8192
MODERNBERT_CONFIG = common.REPO_ROOT / "pretrain" / "configs" / "modernbert.yaml"


def mlm_data() -> tuple[Path, Path]:
    """``(tokenizer_dir, prepared_dir)``: WordPiece on the prose corpus, MLM-framed shards at :data:`SEQ_LEN`, cached."""
    def build(root: Path) -> None:
        common.use_this_checkout()
        from lmforge.prose import write_prose_corpus

        corpus = root / "prose.jsonl"
        write_prose_corpus(corpus)
        env = common.python_env()
        print(f"bench data: WordPiece tokenizer and MLM prep at seq_len {SEQ_LEN} -> {root}", flush=True)
        common.check_child(common.run_child(common.lmforge_cmd(
            "tokenizer", "train", "--input", str(corpus), "--output", str(root / "tokenizer"), "--family", "wordpiece",
            "--vocab-size", str(VOCAB_SIZE), "--model-max-length", str(SEQ_LEN), "--no-progress"), env=env),
            "lmforge tokenizer train")
        common.check_child(common.run_child(common.lmforge_cmd(
            "prep", "--input", str(corpus), "--tokenizer", str(root / "tokenizer"), "--output", str(root / "data"),
            "--seq-len", str(SEQ_LEN), "--objective", "mlm", "--overwrite"), env=env), "lmforge prep")

    root = common.cached_build(common.CACHE_DIR / f"mlm-prose-v{VOCAB_SIZE}-s{SEQ_LEN}", build)
    return root / "tokenizer", root / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (>= 3)")
    parser.add_argument("--steps", type=int, default=12,
                        help=f"optimizer steps per run, a multiple of {SKIP_STEPS} (the first {SKIP_STEPS} are warm-up)")
    args = parser.parse_args(argv)
    common.use_this_checkout()
    if args.steps <= SKIP_STEPS or args.steps % SKIP_STEPS:
        parser.error(f"--steps {args.steps}: need a multiple of {SKIP_STEPS} above {SKIP_STEPS}")
    from lmforge.demo import MLM_DEMO_OVERRIDES
    from pretrain.config import load_config
    from pretrain.trainer import preflight

    tok, data = mlm_data()
    runs: dict[str, list[dict]] = {"lmforge": [], "peer": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-mlm-") as tmp_name:
        tmp = Path(tmp_name)
        config = common.write_train_config(tmp / "mlm.yaml", MODERNBERT_CONFIG, [
            f"seq_len={SEQ_LEN}", *MLM_DEMO_OVERRIDES, "deepspeed.precision=bf16", "data.document_masking=false",
            f"data.path={data}", f"data.tokenizer={tok}", f"max_steps={args.steps}"])
        cfg = load_config(config)

        def lmforge_side() -> float:
            run = common.lmforge_train_file(config, tmp / f"run-{len(runs['lmforge'])}", NPROC, skip_steps=SKIP_STEPS)
            runs["lmforge"].append(run)
            return run["tokens_per_s"]

        def peer_side() -> float:
            run = train_peers.run_peer("trainer-mlm", config, tmp)
            runs["peer"].append(run)
            return run["tokens_per_s"]

        print(f"MLM train step: {NPROC} CPU ranks, {args.steps} steps per run, alternating", flush=True)
        tps = common.alternate({"lmforge": lmforge_side, "peer": peer_side}, args.repeats)
    _, model_config, seq_len = preflight(cfg)
    fpt, n_params = common.flops_per_token(model_config, seq_len)
    ds, m = cfg.deepspeed, cfg.mlm
    threads = max(1, (os.cpu_count() or 1) // NPROC)
    peer_name = "HF Trainer + DeepSpeed + DataCollatorForLanguageModeling (run_mlm.py)"
    note = (f"ModernBERT demo size ({n_params / 1e6:.1f}M parameters), seq_len {SEQ_LEN}, no document masking; peer: "
            f"Trainer(TrainingArguments(deepspeed=lmforge's build_ds_config dict: ZeRO-{ds.zero_stage}, {ds.precision}; "
            f"optim='adamw_torch_fused', lr {cfg.optim.lr}, {cfg.optim.schedule}), data_collator="
            f"DataCollatorForLanguageModeling(tokenizer, mlm_probability={m.probability}, mask_replace_prob="
            f"{m.mask_replace_prob}, random_replace_prob={m.random_replace_prob})); micro batch {ds.micro_batch_size}, "
            f"grad accumulation {ds.gradient_accumulation_steps}, {NPROC} ranks x {threads} thread(s); "
            f"the model's own loss both sides. {MALLOC_NOTE}")
    rows = [common.row(f"MLM train throughput, seq_len {SEQ_LEN}, 2 CPU ranks", "tokens/s", tps["lmforge"], tps["peer"],
                       peer_name, target=">= 1.0x", note=note),
            common.row("MLM peak RSS of one rank", "GiB", [r["peak_rss_bytes"] / 2**30 for r in runs["lmforge"]],
                       [r["peak_rss_bytes"] / 2**30 for r in runs["peer"]], peer_name, better="lower")]
    common.print_rows(rows)
    common.write_result("bench_train_mlm", "Masked-LM train step vs the run_mlm.py recipe (Trainer + DeepSpeed, CPU, 2 ranks)",
                        rows, {"model": cfg.model.preset, "model_overrides": dict(cfg.model.overrides), "parameters": n_params,
                               "flops_per_token": fpt, "nproc": NPROC, "seq_len": SEQ_LEN, "steps": args.steps,
                               "warmup_steps_skipped": SKIP_STEPS, "mlm_probability": m.probability,
                               "micro_batch_size": ds.micro_batch_size, "zero_stage": ds.zero_stage,
                               "precision": ds.precision, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
