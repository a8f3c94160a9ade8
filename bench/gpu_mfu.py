"""MFU of a ~1B Llama in bf16 at seq_len 2048 on one GPU: ZeRO 0 and ZeRO 2, each with and without
activation checkpointing, measured with the real trainer (``python -m lmforge train``).

Model: the ``llama-1b`` preset (GPT-3 XL shape in Llama form: 24 layers, hidden 2048, 16 heads,
SwiGLU 5504) with a 32,000-row embedding (``model.vocab_size``, Llama-2's vocabulary size): about
1.35B parameters. Data: a synthetic corpus generated here (Zipf-distributed pseudo-words, written as
jsonl), a byte-level BPE trained on it and prepared at seq_len 2048 with ``lmforge tokenizer train``
and ``lmforge prep``; the token values do not change the FLOPs.

MFU is what the trainer logs in ``metrics.jsonl`` (``pretrain.flops``: 6N + 12LHQT FLOPs per token,
PaLM appendix B, over the device's dense bf16 peak, looked up from its name or ``--peak-tflops``);
the recomputation of activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
Each configuration trains ``--steps`` steps logging every 5; the first ``--warmup-steps`` are left out
and the median MFU of the remaining windows is kept. The process is then stopped with
``debug.kill_at_step`` right after the last measured step, so that no ~19 GB checkpoint is written
(its exit status -9 is expected). A configuration that runs out of memory is retried at half the
micro batch.

Target (issue 5): >= 50% on one H100. Published anchors: llm-foundry 41.8% for 1B on H100;
torchtitan 33-39% for Llama-3 8B.

Without a CUDA GPU the script prints why it skips and exits 0 (``make bench`` goes on), leaving any
earlier ``bench/results/gpu_mfu.json`` in place. Usage:
``python bench/gpu_mfu.py [--micro-batch-size 8] [--steps 40] [--peak-tflops X]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import common

CONFIGS = [(0, False), (0, True), (2, False), (2, True)]
"""(ZeRO stage, activation checkpointing) pairs measured."""
SEQ_LEN = 2048
VOCAB_ROWS = 32000
TOKENIZER_VOCAB = 8192
LOG_EVERY = 5
TARGET_MFU_PCT = 50.0
ANCHORS = "llm-foundry 41.8% (1B, H100); torchtitan 33-39% (8B)"


def synthetic_corpus(path: Path, words: int, seed: int = 0) -> None:
    """Write about ``words`` Zipf-distributed pseudo-words as jsonl documents of 200-4000 words."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    lexicon = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(30000)]
    weights = 1.0 / np.arange(1, len(lexicon) + 1)
    stream = rng.choice(len(lexicon), size=words, p=weights / weights.sum())
    with open(path, "w", encoding="utf-8") as fh:
        at = 0
        while at < words:
            n = int(rng.integers(200, 4000))
            fh.write(json.dumps({"text": " ".join(lexicon[i] for i in stream[at:at + n])}) + "\n")
            at += n


def prepare_data(root: Path) -> tuple[Path, Path]:
    """``(tokenizer_dir, prepared_dir)`` of the synthetic corpus at seq_len :data:`SEQ_LEN`."""
    corpus, tok, data = root / "corpus.jsonl", root / "tokenizer", root / "data"
    synthetic_corpus(corpus, words=2_000_000)
    env = common.python_env()
    common.check_child(common.run_child(common.lmforge_cmd("tokenizer", "train", "--input", str(corpus), "--output", str(tok),
                                                           "--vocab-size", str(TOKENIZER_VOCAB)), env=env), "tokenizer train")
    common.check_child(common.run_child(common.lmforge_cmd("prep", "--input", str(corpus), "--tokenizer", str(tok),
                                                           "--output", str(data), "--seq-len", str(SEQ_LEN),
                                                           "--val-fraction", "0.05"), env=env), "prep")
    return tok, data


def measure(tok: Path, data: Path, run_dir: Path, zero_stage: int, checkpointing: bool, micro_batch: int,
            steps: int, warmup_steps: int, peak_tflops: float, preset: str = "llama-1b", accelerator: str = "cuda") -> dict:
    """Train one configuration; its median MFU, tokens/s and peak memory, or ``{"error": ...}``.

    ``preset`` and ``accelerator`` (DeepSpeed's ``DS_ACCELERATOR``) exist for a CPU dry run of the mechanics.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = run_dir.parent / "train.yaml"
    config.write_text(f"data:\n  path: {data}\n  tokenizer: {tok}\n", encoding="utf-8")
    overrides = [f"run_dir={run_dir}", f"model.preset={preset}", f"model.vocab_size={VOCAB_ROWS}",
                 "deepspeed.precision=bf16", f"deepspeed.zero_stage={zero_stage}",
                 f"deepspeed.activation_checkpointing={str(checkpointing).lower()}",
                 f"deepspeed.micro_batch_size={micro_batch}", f"max_steps={steps + 1}", f"debug.kill_at_step={steps + 1}",
                 f"log_every_steps={LOG_EVERY}", "optim.lr=3e-4", "optim.warmup_steps=10", "data.eval_batches=1",
                 "show_progress=false", "checkpoint.resume=never", f"peak_tflops={peak_tflops}"]
    result = common.run_child(common.lmforge_cmd("train", str(config), *overrides),
                              env=common.python_env(DS_ACCELERATOR=accelerator))
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    measured = [r for r in records if "tokens_per_s" in r and r["step"] > warmup_steps]
    if result.returncode not in (0, -9) or not measured:
        oom = "out of memory" in result.output.lower()
        return {"error": "out of memory" if oom else f"exit {result.returncode}", "output_tail": result.output[-3000:]}
    if "mfu" not in measured[-1]:
        return {"error": "the trainer knows no peak for this GPU: pass --peak-tflops", "output_tail": result.output[-1000:]}
    return {"mfu_pct": 100 * common.median([r["mfu"] for r in measured]),
            "tokens_per_s": common.steady_tokens_per_s(metrics, warmup_steps),
            "peak_mem_gib": max(r["peak_mem_gib"] for r in measured), "micro_batch_size": micro_batch,
            "windows": len(measured), "wall_s": round(result.wall_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences of 2048 tokens per step (halved on OOM)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of the MFU")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, TFLOP/s; 0 = look it up by name")
    args = parser.parse_args(argv)
    common.use_this_checkout()
    import torch

    if not torch.cuda.is_available():
        print("gpu_mfu: skipped: no CUDA GPU visible (torch.cuda.is_available() is False); run "
              "`python bench/gpu_mfu.py` on a GPU machine to record the MFU of llama-1b", flush=True)
        return 0
    if args.steps < args.warmup_steps + LOG_EVERY:
        parser.error(f"--steps {args.steps}: need at least --warmup-steps + {LOG_EVERY}")
    device = torch.cuda.get_device_name()
    rows, details = [], {"device": device, "seq_len": SEQ_LEN, "vocab_rows": VOCAB_ROWS, "steps": args.steps,
                         "warmup_steps": args.warmup_steps, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-mfu-") as tmp_name:
        tmp = Path(tmp_name)
        tok, data = prepare_data(tmp)
        for stage, ckpt in CONFIGS:
            name = f"ZeRO {stage}, {'with' if ckpt else 'no'} activation checkpointing"
            micro = args.micro_batch_size
            while True:
                print(f"gpu_mfu: {name}, micro batch {micro}", flush=True)
                got = measure(tok, data, tmp / f"z{stage}-ckpt{int(ckpt)}-mb{micro}" / "run", stage, ckpt, micro,
                              args.steps, args.warmup_steps, args.peak_tflops)
                if got.get("error") == "out of memory" and micro > 1:
                    micro //= 2
                    continue
                break
            details["configs"][name] = got
            if "error" in got:
                print(f"gpu_mfu: {name}: {got['error']}\n{got['output_tail']}", flush=True)
                continue
            rows.append(common.row(f"MFU, llama-1b bf16 seq 2048, {name}", "%", got["mfu_pct"],
                                   target=f">= {TARGET_MFU_PCT:g}%",
                                   note=f"{device}; micro batch {got['micro_batch_size']}; {got['tokens_per_s']:,.0f} "
                                        f"tokens/s; peak {got['peak_mem_gib']:.1f} GiB; anchors: {ANCHORS}"))
    common.print_rows(rows)
    common.write_result("gpu_mfu", f"MFU of llama-1b on one GPU ({device})", rows, details)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
