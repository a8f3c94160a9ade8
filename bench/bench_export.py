"""Export speed and memory: ``lmforge export`` against DeepSpeed's ``zero_to_fp32`` on one ZeRO-3 checkpoint.

Targets (issue 8): a ZeRO-3 checkpoint of a model of at least 1 GB in fp32; lmforge's peak RSS at
most 0.6x the fp32 model bytes, its time at most 1.0x zero_to_fp32's.

1. Builds (once, cached in ``--work``) a real checkpoint with the real trainer: ``llama-350m`` (about
   310M parameters with the bench's 512-token vocabulary, 1.24 GB in fp32), ZeRO-3, fp32, 2 CPU ranks,
   one optimizer step (so the files also hold Adam moments, as a real checkpoint does).
2. Runs, alternating, ``--repeats`` times each, every run a fresh process:
   ``lmforge export TAG OUT --no-verify`` (consolidation + config, tokenizer, card; verification is a
   separate reload, timed once below) and ``python -m deepspeed.utils.zero_to_fp32 RUN/checkpoints OUT
   --tag TAG --safe_serialization`` (same fp32 safetensors, 5GB shards). Wall time and the child's own
   peak RSS (``os.wait4``) are recorded; medians are compared.
3. Checks both outputs are bit-identical, times one full export with verification, prints the ratios
   and writes them to ``--json``.

``python bench/export_bench.py [--work runs/bench-export] [--repeats 3] [--json runs/bench-export/result.json]``
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

RSS_TARGET = 0.6
TIME_TARGET = 1.0


def build_checkpoint(work: Path, preset: str) -> Path:
    """A ZeRO-3 checkpoint of ``preset`` trained one step by ``lmforge train`` on 2 local ranks; returns its folder."""
    from data_prep.prep import PrepConfig, prepare
    from data_prep.tokenizer import train_byte_bpe
    from launch.local import run_local
    from pretrain.checkpoint import latest_complete

    run = work / "run"
    done = latest_complete(run / "checkpoints")
    if done is not None:
        return done
    corpus = [str(Path(sysconfig.get_paths()["stdlib"]) / "json")]
    train_byte_bpe(corpus, work / "tokenizer", vocab_size=512, model_max_length=64)
    prepare(PrepConfig(inputs=corpus, tokenizer=str(work / "tokenizer"), output=str(work / "data"), seq_len=64,
                       val_fraction=0.2, show_progress=False, overwrite=True))
    config = work / "train.yaml"
    config.write_text(f"run_dir: {run}\ndata:\n  path: {work / 'data'}\n  tokenizer: {work / 'tokenizer'}\n")
    run_local([sys.executable, "-m", "lmforge", "train", str(config), f"model.preset={preset}", "deepspeed.zero_stage=3",
               "deepspeed.precision=fp32", "deepspeed.micro_batch_size=1", "max_steps=1", "data.eval_batches=1",
               "show_progress=false"], 2, env={"DS_ACCELERATOR": "cpu"})
    return latest_complete(run / "checkpoints")


def timed(cmd: list[str]) -> tuple[float, float]:
    """``(wall seconds, peak RSS bytes)`` of ``cmd`` run as a child process (its own ru_maxrss, via wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024  # KiB on Linux


def identical(a: Path, b: Path) -> bool:
    """Same tensor names and bytes in the safetensors of two folders, one tensor in memory at a time."""
    import torch
    from safetensors import safe_open

    def handles(folder: Path) -> dict:
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            f = safe_open(str(path), framework="pt")
            out.update({k: f for k in f.keys()})
        return out

    ha, hb = handles(a), handles(b)
    return set(ha) == set(hb) and all(torch.equal(ha[k].get_tensor(k), hb[k].get_tensor(k)) for k in ha)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench-export", help="cache folder for the checkpoint and the outputs")
    p.add_argument("--preset", default="llama-350m", help="model preset (>= 1 GB in fp32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median)")
    p.add_argument("--json", default=None, help="result file (default WORK/result.json)")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tag_dir = build_checkpoint(work, args.preset)
    from pretrain.consolidate import plan_checkpoint

    plan = plan_checkpoint(tag_dir)
    model_bytes = sum(t.numel for t in plan.tensors) * 4
    ours, peer = work / "out-lmforge", work / "out-zero_to_fp32"
    lmforge_cmd = [sys.executable, "-m", "lmforge", "export", str(tag_dir), str(ours), "--overwrite", "--no-verify"]
    peer_cmd = [sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(tag_dir.parent), str(peer), "--tag", tag_dir.name,
                "--safe_serialization"]
    runs = {"lmforge": [], "zero_to_fp32": []}
    for i in range(args.repeats):
        for name, cmd, out in (("lmforge", lmforge_cmd, ours), ("zero_to_fp32", peer_cmd, peer))[:: 1 if i % 2 == 0 else -1]:
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(timed(cmd))
            print(f"run {i + 1}: {name:13s} {runs[name][-1][0]:6.2f} s, peak RSS {runs[name][-1][1] / 2**20:7.0f} MiB", flush=True)
    same = identical(ours, peer)
    shutil.rmtree(ours, ignore_errors=True)
    verify_wall, verify_rss = timed([*lmforge_cmd[:-1]])  # full export with the fresh-process verification
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in runs.items()}
    result = {"checkpoint": str(tag_dir), "zero_stage": plan.zero_stage, "world_size": plan.world_size,
              "n_params": plan.n_params, "fp32_model_bytes": model_bytes, "repeats": args.repeats,
              "lmforge_s": med["lmforge"][0], "zero_to_fp32_s": med["zero_to_fp32"][0],
              "lmforge_peak_rss_bytes": med["lmforge"][1], "zero_to_fp32_peak_rss_bytes": med["zero_to_fp32"][1],
              "time_ratio": med["lmforge"][0] / med["zero_to_fp32"][0],
              "rss_ratio": med["lmforge"][1] / model_bytes,
              "zero_to_fp32_rss_ratio": med["zero_to_fp32"][1] / model_bytes,
              "outputs_identical": same, "export_with_verification_s": verify_wall,
              "runs": {k: [{"wall_s": w, "peak_rss_bytes": r} for w, r in v] for k, v in runs.items()}}
    result["meets_targets"] = result["rss_ratio"] <= RSS_TARGET and result["time_ratio"] <= TIME_TARGET and same
    out = Path(args.json) if args.json else work / "result.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model: {plan.n_params / 1e6:.0f}M parameters, {model_bytes / 1e9:.2f} GB fp32, ZeRO-{plan.zero_stage} over "
          f"{plan.world_size} ranks")
    print(f"peak RSS ratio (lmforge / fp32 model bytes): {result['rss_ratio']:.3f} (target <= {RSS_TARGET}; "
          f"zero_to_fp32: {result['zero_to_fp32_rss_ratio']:.3f})")
    print(f"time ratio (lmforge / zero_to_fp32): {result['time_ratio']:.3f} (target <= {TIME_TARGET}; "
          f"{result['lmforge_s']:.2f} s vs {result['zero_to_fp32_s']:.2f} s, median of {args.repeats})")
    print(f"outputs bit-identical: {same}; full export with fresh-process verification: {verify_wall:.1f} s -> {out}")
    return result


if __name__ == "__main__":
    main()
