"""The train step: lmforge vs the Hugging Face ``transformers.Trainer`` with the same DeepSpeed config,
model, micro batch, precision, optimizer and inputs, on CPU with 2 data-parallel ranks.

Both sides train the demo config (``pretrain/configs/demo.yaml``: ``llama-tiny``, micro batch 8,
ZeRO-2, bf16, AdamW, warmup + cosine) on the prepared bench corpus (``common.bench_data``, 256-token
sequences), each rank with ``cores / 2`` threads, both started by ``launch.local.run_local``:

- lmforge: ``lmforge launch local --nproc 2`` (the real trainer), tokens/s from its ``metrics.jsonl``;
- peer: ``Trainer(args=TrainingArguments(deepspeed=<lmforge's generated ds_config dict>, ...))``
  with the model built by the same code and seed, the same AdamW hyper-parameters and schedule, and
  a collate function producing the very tensors lmforge feeds its model (``input_ids``,
  ``labels`` and the document-masking ``position_ids``, see ``common.collate_rows``);
  tokens/s from a callback's step-end times.

The model, its weights and inputs are the same; the loss computation is not: lmforge's training
steps use its fused, chunked lm_head + cross-entropy (``pretrain.loss``, ``model.loss_chunk_tokens``;
no full ``(B, T, V)`` float32 logits), the Trainer the model's own (transformers' ``ForCausalLMLoss``).
With ``model.loss_chunk_tokens=0`` both run the same loss code, and the ratio was 0.97-1.04x over
several runs (the rest of the step is the same model under the same DeepSpeed config).

Both figures are steady state: the first 4 steps (warm-up) are left out; lmforge logs every 4 steps
(a log record is an all-reduce, so the bench does not log every step). FLOPs per token follow
``pretrain.flops`` (6N + 12LHQT, PaLM appendix B); a CPU has no listed peak, so the script reports
achieved TFLOP/s per rank, and MFU when ``--peak-tflops`` (of one rank's cores) is given.
Target (issue 5): lmforge tokens/s >= 1.0x the Trainer's.

Usage: ``python bench/bench_train.py [--repeats 5] [--steps 32] [--peak-tflops X]``; writes
``bench/results/bench_train.json``. ``--hf-worker`` is the per-rank entry point of the peer side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common

NPROC = 2
SKIP_STEPS = 4
DEMO_CONFIG = common.REPO_ROOT / "pretrain" / "configs" / "demo.yaml"


def lmforge_config(tok: Path, data: Path, steps: int):
    """The demo training config on the bench data, as both sides use it."""
    from pretrain.config import load_config

    return load_config(DEMO_CONFIG, [f"data.path={data}", f"data.tokenizer={tok}", f"max_steps={steps}"])


def flops_per_token(tok: Path, data: Path) -> tuple[float, int]:
    """``(training FLOPs per token, parameters)`` of the demo model on the bench data."""
    from pretrain.trainer import preflight

    _, model_config, seq_len = preflight(lmforge_config(tok, data, 1))
    return common.flops_per_token(model_config, seq_len)


def training_arguments(cfg, world_size: int, output_dir: str):
    """``TrainingArguments`` equal to the lmforge config: batch, precision, ds_config, AdamW, schedule."""
    from transformers import TrainingArguments

    from pretrain.engine import SCHEDULER_NAMES, build_ds_config

    opt, ds = cfg.optim, cfg.deepspeed
    schedule_kwargs = {"cosine": {"min_lr_rate": opt.min_lr_ratio}}.get(opt.schedule, {})
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=ds.micro_batch_size,
        gradient_accumulation_steps=ds.gradient_accumulation_steps, max_steps=cfg.max_steps,
        bf16=ds.precision == "bf16", fp16=ds.precision == "fp16", deepspeed=build_ds_config(cfg, world_size),
        optim="adamw_torch", learning_rate=opt.lr, weight_decay=opt.weight_decay, adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1], adam_epsilon=opt.eps, max_grad_norm=opt.grad_clip, warmup_steps=opt.warmup_steps,
        lr_scheduler_type=SCHEDULER_NAMES[opt.schedule], lr_scheduler_kwargs=schedule_kwargs,
        logging_steps=10**9, save_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False,
        seed=cfg.seed, use_cpu=True, disable_tqdm=True)


def hf_worker(tok: Path, data: Path, steps: int, result_path: Path) -> int:
    """One rank of the Hugging Face Trainer side; rank 0 writes ``{tokens_per_s, step_end_s}``."""
    from functools import partial

    import datasets
    from transformers import Trainer, TrainerCallback

    from pretrain.model import build_model
    from pretrain.trainer import preflight

    cfg = lmforge_config(tok, data, steps)
    _, model_config, seq_len = preflight(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_model(model_config, cfg.seed)
    train = datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in common.shard_paths(data)])

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    times = StepTimes()
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out:
        trainer = Trainer(model=model, args=training_arguments(cfg, world_size, out), train_dataset=train,
                          data_collator=partial(common.collate_rows, document_masking=cfg.data.document_masking),
                          callbacks=[times])
        trainer.train()
        engine = type(trainer.model_wrapped).__name__
    if int(os.environ.get("RANK", "0")) == 0:
        ds = cfg.deepspeed
        tokens_per_step = ds.micro_batch_size * ds.gradient_accumulation_steps * world_size * seq_len
        steady = len(times.ends) - SKIP_STEPS
        result = {"tokens_per_s": steady * tokens_per_step / (times.ends[-1] - times.ends[SKIP_STEPS - 1]),
                  "steps": len(times.ends), "engine": engine}
        result_path.write_text(json.dumps(result))
    return 0


def run_hf(tok: Path, data: Path, steps: int, tmp: Path) -> dict:
    """The Trainer side on :data:`NPROC` ranks (``run_local``); tokens/s, wall time and peak RSS."""
    result_path = tmp / f"hf-{time.monotonic_ns()}.json"
    worker = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", "--tokenizer", str(tok), "--data", str(data),
              "--steps", str(steps), "--result", str(result_path)]
    launcher = f"import sys; from launch.local import run_local; run_local(sys.argv[1:], {NPROC})"
    res = common.run_child([sys.executable, "-c", launcher, *worker],
                           env=common.python_env(**common.CPU_ONLY_ENV))
    common.check_child(res, "the Hugging Face Trainer side")
    out = json.loads(result_path.read_text())
    if out["engine"] != "DeepSpeedEngine":
        raise RuntimeError(f"the Trainer did not train through DeepSpeed (model wrapped in {out['engine']})")
    return {**out, "wall_s": round(res.wall_s, 2), "peak_rss_bytes": res.peak_rss_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (>= 3; 5 by default: the noisiest of the benches)")
    parser.add_argument("--steps", type=int, default=32,
                        help=f"optimizer steps per run, a multiple of {SKIP_STEPS} (the first {SKIP_STEPS} are warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak TFLOP/s of one rank's cores, for MFU")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.use_this_checkout()
    if args.hf_worker:
        return hf_worker(args.tokenizer, args.data, args.steps, args.result)
    if args.steps <= SKIP_STEPS or args.steps % SKIP_STEPS:
        parser.error(f"--steps {args.steps}: need a multiple of {SKIP_STEPS} above {SKIP_STEPS} "
                     f"(the first {SKIP_STEPS} are warm-up)")
    tok, data = common.bench_data()
    fpt, n_params = flops_per_token(tok, data)
    runs: dict[str, list[dict]] = {"lmforge": [], "peer": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_name:
        tmp = Path(tmp_name)

        def lmforge_side() -> float:
            run = common.lmforge_train(tok, data, tmp / f"run-{len(runs['lmforge'])}", NPROC, args.steps,
                                       skip_steps=SKIP_STEPS)
            runs["lmforge"].append(run)
            return run["tokens_per_s"]

        def peer_side() -> float:
            run = run_hf(tok, data, args.steps, tmp)
            runs["peer"].append(run)
            return run["tokens_per_s"]

        print(f"train step: {NPROC} CPU ranks, {args.steps} steps per run, alternating", flush=True)
        tps = common.alternate({"lmforge": lmforge_side, "peer": peer_side}, args.repeats)

    def tflops_per_rank(values):
        return [v * fpt / NPROC / 1e12 for v in values]

    peer_name = "HF Trainer + DeepSpeed"
    rows = [common.row("training throughput, 2 CPU ranks", "tokens/s", tps["lmforge"], tps["peer"], peer_name,
                       target=">= 1.0x", note="lmforge: fused chunked lm_head + cross-entropy (pretrain.loss); "
                                               "peer: transformers' loss on full float32 logits"),
            common.row("achieved per rank", "TFLOP/s", tflops_per_rank(tps["lmforge"]), tflops_per_rank(tps["peer"]),
                       peer_name, note=f"{fpt:.4g} FLOPs/token (6N + 12LHQT)"),
            common.row("peak RSS of one rank", "GiB", [r["peak_rss_bytes"] / 2**30 for r in runs["lmforge"]],
                       [r["peak_rss_bytes"] / 2**30 for r in runs["peer"]], peer_name, better="lower")]
    if args.peak_tflops > 0:
        rows.append(common.row("MFU", "%", [100 * t / args.peak_tflops for t in tflops_per_rank(tps["lmforge"])],
                               [100 * t / args.peak_tflops for t in tflops_per_rank(tps["peer"])], peer_name,
                               note=f"peak {args.peak_tflops} TFLOP/s per rank (--peak-tflops)"))
    common.print_rows(rows)
    cfg = lmforge_config(tok, data, args.steps)
    common.write_result("bench_train", "Train step vs Hugging Face Trainer, same DeepSpeed config (CPU, 2 ranks)", rows, {
        "model": cfg.model.preset, "parameters": n_params, "flops_per_token": fpt, "nproc": NPROC,
        "micro_batch_size": cfg.deepspeed.micro_batch_size, "zero_stage": cfg.deepspeed.zero_stage,
        "precision": cfg.deepspeed.precision, "document_masking": cfg.data.document_masking, "steps": args.steps,
        "warmup_steps_skipped": SKIP_STEPS, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
