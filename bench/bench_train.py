"""The train step, a 2x2 plus a floor: {lmforge, HF Trainer + DeepSpeed} x {the model's own loss, lmforge's fused
loss}, and bare torch DDP + AdamW, on CPU with 2 data-parallel ranks. Unit: tokens/s, all ranks together.

Every side trains one resolved config, written once per model with ``pretrain.config.to_yaml``: the demo
config (``pretrain/configs/demo.yaml``: micro batch 8, gradient accumulation 1, ZeRO-2, bf16, AdamW lr 2e-3,
warmup 40 + cosine to 0.1, grad clip 1.0, seed 1234, document masking) with ``model.preset`` and
``seq_len=512``, on the stdlib bench corpus prepared at 512 tokens (``common.bench_data(seq_len=512)``, an
8192-token byte-level BPE). Each rank runs ``cores / 2`` threads (``launch.local.run_local`` sets
``OMP_NUM_THREADS``). The five sides alternate within each round (``common.alternate``):

- ``lmforge/fused``: ``lmforge launch local --nproc 2`` as shipped: the fused chunked lm_head + cross-entropy
  (``pretrain.loss``, ``model.loss_chunk_tokens=1024``); tokens/s from its ``metrics.jsonl``.
- ``lmforge/own``: the same with ``model.loss_chunk_tokens=0`` (transformers' own loss).
- ``trainer/own``: ``transformers.Trainer`` + ``TrainingArguments(deepspeed=<lmforge's generated ds_config>,
  optim="adamw_torch_fused", ...)``, the model's own loss (see ``bench/train_peers.py``).
- ``trainer/fused``: the same Trainer with lmforge's public ``pretrain.loss.enable_fused_loss`` on the model.
- ``ddp-floor``: bare torch, gloo ``DistributedDataParallel`` + fused ``torch.optim.AdamW``, bf16 autocast.

Rows (ratios above 1 = lmforge faster; each with the range of its per-round ratios): lmforge vs the Trainer at
the same loss (fused/fused, own/own: the fair comparisons of the framework, target >= 1.0x), lmforge as shipped
vs the Trainer as shipped (fused vs own: the loss's gain, no target), and both lmforge sides vs the DDP floor.
Steady state: the first 4 optimizer steps are left out (lmforge logs every 4 steps: a log record is an
all-reduce). FLOPs per token follow ``pretrain.flops`` (6N + 12LHQT); a CPU has no listed peak, so the script
reports achieved TFLOP/s per rank, and MFU when ``--peak-tflops`` (of one rank's cores) is given.

Default (``make bench``): llama-tiny at seq_len 512, 3 rounds of 12 steps: 15 runs (with bench_train_mlm.py,
about 7 minutes on 2 idle cores, 2026-12-03). ``--full`` (``make bench-full``) adds llama-125m at seq_len 512 (``--full-steps``,
8 by default; its rows are marked "(bench-full)"), at the demo's micro batch 8 (8192 tokens, about 5 TFLOP per
step); ``--full-micro-batch N`` sets a smaller one for slower machines. Usage: ``python bench/bench_train.py
[--full] [--repeats 3] [--steps 12] [--full-steps 8] [--full-micro-batch N] [--peak-tflops X]``; writes
``bench/results/bench_train.json``. The masked-LM row is ``bench/bench_train_mlm.py``.
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

DEMO_CONFIG = common.REPO_ROOT / "pretrain" / "configs" / "demo.yaml"
SEQ_LEN = 512
DEFAULT_MODELS = ("llama-tiny",)
FULL_MODELS = ("llama-125m",)
SIDES = ("lmforge/fused", "lmforge/own", "trainer/fused", "trainer/own", "ddp-floor")


def write_configs(preset: str, tok: Path, data: Path, steps: int, tmp: Path, micro_batch: int | None) -> dict[str, Path]:
    """The two resolved configs of ``preset``: ``fused`` (lmforge's default loss) and ``own`` (loss_chunk_tokens=0);
    ``micro_batch`` (sequences per rank) replaces the demo's when given."""
    base = [f"model.preset={preset}", f"seq_len={SEQ_LEN}", f"data.path={data}", f"data.tokenizer={tok}", f"max_steps={steps}"]
    if micro_batch is not None:
        base.append(f"deepspeed.micro_batch_size={micro_batch}")
    return {"fused": common.write_train_config(tmp / f"{preset}-fused.yaml", DEMO_CONFIG, base),
            "own": common.write_train_config(tmp / f"{preset}-own.yaml", DEMO_CONFIG, [*base, "model.loss_chunk_tokens=0"])}


def measure_model(preset: str, tok: Path, data: Path, steps: int, repeats: int, tmp: Path,
                  micro_batch: int | None) -> tuple[dict, dict]:
    """Alternating rounds of the five :data:`SIDES` on ``preset``: ``(tokens/s per side, run details per side)``."""
    configs = write_configs(preset, tok, data, steps, tmp, micro_batch)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}

    def side(name: str):
        framework, loss = name.split("/") if "/" in name else (name, "own")

        def measure() -> float:
            if framework == "lmforge":
                run = common.lmforge_train_file(configs[loss], tmp / f"{preset}-{loss}-{len(runs[name])}", NPROC,
                                                skip_steps=SKIP_STEPS)
            else:
                run = train_peers.run_peer("trainer" if framework == "trainer" else "ddp", configs[loss], tmp, loss)
            runs[name].append(run)
            return run["tokens_per_s"]

        return measure

    print(f"train step, {preset} seq_len {SEQ_LEN}: {NPROC} CPU ranks, {steps} steps per run, "
          f"{len(SIDES)} sides alternating", flush=True)
    return common.alternate({name: side(name) for name in SIDES}, repeats), runs


def settings(cfg) -> dict[str, str]:
    """The exact settings of each peer, for the rows' notes."""
    ds, opt = cfg.deepspeed, cfg.optim
    threads = max(1, (os.cpu_count() or 1) // NPROC)
    common_part = (f"{NPROC} ranks x {threads} thread(s) (run_local), seq_len {SEQ_LEN}, micro batch {ds.micro_batch_size}, "
                   f"grad accumulation {ds.gradient_accumulation_steps}, {ds.precision}")
    trainer = (f"transformers.Trainer(TrainingArguments(deepspeed=lmforge's build_ds_config dict: ZeRO-{ds.zero_stage}, "
               f"{ds.precision}, gradient_clipping {opt.grad_clip}; optim='adamw_torch_fused', lr {opt.lr}, "
               f"warmup {opt.warmup_steps} + {opt.schedule}), data_collator=common.collate_rows), model.config.use_cache=False; "
               + common_part)
    return {
        "lmforge": f"lmforge launch local --nproc {NPROC}, demo.yaml + model.preset={cfg.model.preset}; " + common_part,
        "trainer": trainer,
        "ddp": (f"bare torch: DistributedDataParallel(gloo, default 25 MB buckets), torch.optim.AdamW(fused=True, lr {opt.lr}, "
                f"decay on matrices only), LambdaLR warmup + cosine, clip_grad_norm_({opt.grad_clip}), model's own loss, "
                f"torch.autocast('cpu', bfloat16) over float32 weights (DeepSpeed: bf16 weights + float32 master); " + common_part),
    }


def model_rows(preset: str, tps: dict, runs: dict, cfg, fpt: float, peak_tflops: float, full: bool) -> list[dict]:
    """The rows of one model: lmforge vs the Trainer at the same loss, as shipped, vs the DDP floor; TFLOP/s, RSS."""
    s = settings(cfg)
    mark = " (bench-full)" if full else ""
    where = f"{preset}, seq_len {SEQ_LEN}, 2 CPU ranks"
    fused_peer = "HF Trainer + DeepSpeed + lmforge's fused loss"
    rows = [
        common.row(f"train throughput, {where}: both fused loss", "tokens/s", tps["lmforge/fused"], tps["trainer/fused"],
                   fused_peer, target="" if full else ">= 1.0x",
                   note=f"same loss both sides: pretrain.loss.enable_fused_loss(model, {cfg.model.loss_chunk_tokens}) "
                        f"before Trainer(...), compute_loss takes outputs.loss. Peer: {s['trainer']}. {MALLOC_NOTE}{mark}"),
        common.row(f"train throughput, {where}: both own loss", "tokens/s", tps["lmforge/own"], tps["trainer/own"],
                   "HF Trainer + DeepSpeed", target="" if full else ">= 1.0x",
                   note=f"same loss both sides: transformers' ForCausalLMLoss on full float32 logits "
                        f"(lmforge: model.loss_chunk_tokens=0). Peer: {s['trainer']}. {MALLOC_NOTE}{mark}"),
        common.row(f"train throughput, {where}: as shipped", "tokens/s", tps["lmforge/fused"], tps["trainer/own"],
                   "HF Trainer + DeepSpeed",
                   note=f"lmforge's default (fused loss) vs the Trainer's default (own loss): the gain is the loss, "
                        f"see the two rows above{mark}"),
        common.row(f"train throughput, {where}: fused vs floor", "tokens/s", tps["lmforge/fused"], tps["ddp-floor"],
                   "bare torch DDP + AdamW", note=f"floor: {s['ddp']}{mark}"),
        common.row(f"train throughput, {where}: own loss vs floor", "tokens/s", tps["lmforge/own"], tps["ddp-floor"],
                   "bare torch DDP + AdamW", note=f"same loss both sides (the model's own); floor: {s['ddp']}{mark}"),
    ]
    per_rank = {k: [v * fpt / NPROC / 1e12 for v in vals] for k, vals in tps.items()}
    rows.append(common.row(f"achieved per rank, {where}: both fused loss", "TFLOP/s", per_rank["lmforge/fused"],
                           per_rank["trainer/fused"], fused_peer, note=f"{fpt:.4g} FLOPs/token (6N + 12LHQT){mark}"))
    if peak_tflops > 0:
        rows.append(common.row(f"MFU, {where}: both fused loss", "%", [100 * t / peak_tflops for t in per_rank["lmforge/fused"]],
                               [100 * t / peak_tflops for t in per_rank["trainer/fused"]], fused_peer,
                               note=f"peak {peak_tflops} TFLOP/s per rank (--peak-tflops){mark}"))
    rss = {k: [r["peak_rss_bytes"] / 2**30 for r in runs[k]] for k in runs}
    rows.append(common.row(f"peak RSS of one rank, {where}: both fused loss", "GiB", rss["lmforge/fused"], rss["trainer/fused"],
                           fused_peer, better="lower", note=mark.strip()))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help=f"also {', '.join(FULL_MODELS)} (make bench-full)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (>= 3)")
    parser.add_argument("--steps", type=int, default=12, help=f"optimizer steps per run of {', '.join(DEFAULT_MODELS)}, "
                        f"a multiple of {SKIP_STEPS} (the first {SKIP_STEPS} are warm-up)")
    parser.add_argument("--full-steps", type=int, default=8, help=f"optimizer steps per run of {', '.join(FULL_MODELS)}")
    parser.add_argument("--full-micro-batch", type=int, default=0,
                        help=f"micro batch (sequences per rank) of {', '.join(FULL_MODELS)}; 0: the demo config's")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak TFLOP/s of one rank's cores, for MFU")
    args = parser.parse_args(argv)
    common.use_this_checkout()
    for option, steps in (("--steps", args.steps), ("--full-steps", args.full_steps)):
        if steps <= SKIP_STEPS or steps % SKIP_STEPS:
            parser.error(f"{option} {steps}: need a multiple of {SKIP_STEPS} above {SKIP_STEPS} (the first {SKIP_STEPS} are warm-up)")
    if args.full_micro_batch < 0:
        parser.error(f"--full-micro-batch {args.full_micro_batch}: need 0 (the demo config's) or more sequences per rank")
    from pretrain.config import load_config
    from pretrain.trainer import preflight

    tok, data = common.bench_data(seq_len=SEQ_LEN)
    models = ([(p, args.steps, None, False) for p in DEFAULT_MODELS]
              + [(p, args.full_steps, args.full_micro_batch or None, True) for p in FULL_MODELS if args.full])
    rows: list[dict] = []
    details: dict = {"nproc": NPROC, "seq_len": SEQ_LEN, "warmup_steps_skipped": SKIP_STEPS, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_name:
        for preset, steps, micro_batch, full in models:
            tps, runs = measure_model(preset, tok, data, steps, args.repeats, Path(tmp_name), micro_batch)
            cfg = load_config(Path(tmp_name) / f"{preset}-fused.yaml")
            _, model_config, seq_len = preflight(cfg)
            fpt, n_params = common.flops_per_token(model_config, seq_len)
            rows += model_rows(preset, tps, runs, cfg, fpt, args.peak_tflops, full)
            details["models"][preset] = {
                "parameters": n_params, "flops_per_token": fpt, "steps": steps, "bench_full": full,
                "micro_batch_size": cfg.deepspeed.micro_batch_size, "zero_stage": cfg.deepspeed.zero_stage,
                "precision": cfg.deepspeed.precision, "document_masking": cfg.data.document_masking,
                "loss_chunk_tokens": cfg.model.loss_chunk_tokens, "settings": settings(cfg), "runs": runs}
    common.print_rows(rows)
    common.write_result("bench_train", "Train step: lmforge vs HF Trainer + DeepSpeed at the same loss, and a bare DDP floor "
                        "(CPU, 2 ranks)", rows, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
