"""Export speed and memory: ``lmforge export`` against DeepSpeed's ``zero_to_fp32`` on one ZeRO-3 checkpoint.

Targets (issue 8): a ZeRO-3 checkpoint of a model of at least 1 GB in fp32; lmforge's peak RSS at
most 0.6x the fp32 model bytes, its time at most 1.0x zero_to_fp32's (ratio >= 1.0x below, where a
ratio above 1 means lmforge is faster).

1. Builds once, cached in ``--work`` (default ``bench/.cache/export``, git-ignored; about 4 GB on
   disk, a few minutes on 2 cores), a real checkpoint with the real trainer: ``llama-350m`` (about
   310M parameters with the bench's 512-token vocabulary, 1.24 GB in fp32), ZeRO-3, fp32, 2 CPU
   ranks, one optimizer step (so the files also hold Adam moments, as a real checkpoint does).
   Reruns reuse it.
2. Reads the checkpoint files once, so neither side's first round pays for a cold page cache.
3. Runs, alternating (``common.alternate``), ``--repeats`` times each, every run a fresh process whose
   interpreter start-up and imports are timed with it (:data:`SIDES` says what each side does):
   ``lmforge export TAG OUT --no-verify`` (consolidation + config, tokenizer, card; verification is a
   separate reload, timed once below) and ``python -m deepspeed.utils.zero_to_fp32 RUN/checkpoints OUT
   --tag TAG --safe_serialization`` (same fp32 safetensors, 5GB shards). Each side's output folder is
   deleted before its run, outside the timing. Wall time and the child's own peak RSS (``os.wait4``,
   ``common.run_child``) are recorded; medians are compared.
4. Checks both outputs are bit-identical (exit 1 when not), times one full export with verification,
   prints the ratios; the outputs are then deleted (the checkpoint stays).

Usage: ``python bench/bench_export.py [--work bench/.cache/export] [--preset llama-350m] [--repeats 3]
[--json FILE]``; writes ``bench/results/bench_export.json`` (and a copy to ``--json`` when given).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import common

RSS_TARGET = 0.6
TIME_TARGET = 1.0
SIDES = {
    "lmforge": "python -m lmforge export TAG OUT --overwrite --no-verify: interpreter start-up and imports (the fp32 "
               "path imports neither torch, DeepSpeed nor transformers), checks of the run (state, tokenizer and data "
               "fingerprints), the checkpoint structure from the files' pickles, model.safetensors (tensors copied "
               "as stored, os.copy_file_range), config.json, generation_config.json, tokenizer files, loss curve "
               "(matplotlib), model card, lmforge_export.json, rename of OUT.tmp to OUT",
    "peer": "python -m deepspeed.utils.zero_to_fp32 RUN/checkpoints OUT --tag TAG --safe_serialization: interpreter "
            "start-up, torch + DeepSpeed imports, torch.load of every rank's files (mmap), consolidation in memory, "
            "model.safetensors via safetensors.torch.save_file (weights only: no config, tokenizer or card)",
}
"""What each timed process does, start to exit (recorded in the result JSON)."""


HEAVY_MODULES = ("torch", "deepspeed", "transformers", "matplotlib", "numpy", "pyarrow")


def heavy_imports(cmd: list[str], env: dict[str, str], out: Path) -> list[str]:
    """Which of :data:`HEAVY_MODULES` the process ``cmd`` (``python -m ...``) imports, from ``-X importtime``
    (one untimed run; ``out`` is deleted before and after)."""
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env={**os.environ, **env}, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -X importtime failed: {proc.stderr[-3000:]}")
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY_MODULES if m in names]


def warm_page_cache(tag_dir: Path) -> int:
    """Read every file of the checkpoint once (1 MiB at a time); returns the bytes read."""
    total = 0
    for path in sorted(tag_dir.iterdir()):
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
    return total


def build_checkpoint(work: Path, preset: str) -> Path:
    """A ZeRO-3 checkpoint of ``preset`` trained one step by ``lmforge train`` on 2 local ranks; returns its folder.

    Reuses the newest complete checkpoint of ``work/run-<preset>`` (a checkpoint counts once its
    state file is written, after every rank's files).
    """
    from data_prep.prep import PrepConfig, prepare
    from data_prep.tokenizer.train import train_byte_bpe
    from launch.local import run_local
    from pretrain.checkpoint import latest_complete

    run = work / f"run-{preset}"
    done = latest_complete(run / "checkpoints")
    if done is not None:
        return done
    print(f"building a ZeRO-3 fp32 checkpoint of {preset} on 2 CPU ranks -> {run} (once; reruns reuse it)", flush=True)
    corpus = [str(Path(sysconfig.get_paths()["stdlib"]) / "json")]
    train_byte_bpe(corpus, work / "tokenizer", vocab_size=512, model_max_length=64)
    prepare(PrepConfig(inputs=corpus, tokenizer=str(work / "tokenizer"), output=str(work / "data"), seq_len=64,
                       val_fraction=0.2, show_progress=False, overwrite=True))
    config = work / "train.yaml"
    config.write_text(f"run_dir: {run}\ndata:\n  path: {work / 'data'}\n  tokenizer: {work / 'tokenizer'}\n")
    run_local([sys.executable, "-m", "lmforge", "train", str(config), f"model.preset={preset}", "deepspeed.zero_stage=3",
               "deepspeed.precision=fp32", "deepspeed.micro_batch_size=1", "max_steps=1", "data.eval_batches=1",
               "show_progress=false"], 2, env={**common.python_env(), "DS_ACCELERATOR": "cpu"})
    tag = latest_complete(run / "checkpoints")
    assert tag is not None, f"{run}: the training run saved no checkpoint"
    return tag


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(common.CACHE_DIR / "export"), help="cache folder for the checkpoint and the outputs")
    p.add_argument("--preset", default="llama-350m", help="model preset (>= 1 GB in fp32)")
    p.add_argument("--repeats", type=int, default=common.MIN_REPEATS, help="alternating rounds (>= 3)")
    p.add_argument("--json", default=None, help="also write the result JSON here")
    args = p.parse_args(argv)
    common.use_this_checkout()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tag_dir = build_checkpoint(work, args.preset)
    from pretrain.export.consolidate import plan_checkpoint

    plan = plan_checkpoint(tag_dir)
    model_bytes = sum(t.numel for t in plan.tensors) * 4
    model_gb = model_bytes / 1e9
    print(f"model: {plan.n_params / 1e6:.0f}M parameters, {model_gb:.2f} GB fp32, ZeRO-{plan.zero_stage} over "
          f"{plan.world_size} ranks", flush=True)
    ours, peer = work / "out-lmforge", work / "out-zero_to_fp32"
    lmforge_cmd = common.lmforge_cmd("export", str(tag_dir), str(ours), "--overwrite", "--no-verify")
    peer_cmd = [sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(tag_dir.parent), str(peer), "--tag", tag_dir.name,
                "--safe_serialization"]
    env = common.python_env(**common.CPU_ONLY_ENV)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    warm_page_cache(tag_dir)
    rss: dict[str, list[int]] = {"lmforge": [], "peer": []}

    def run(side: str, cmd: list[str], out: Path) -> float:
        shutil.rmtree(out, ignore_errors=True)
        result = common.run_child(cmd, env=env)
        common.check_child(result, f"{side} export")
        rss[side].append(result.peak_rss_bytes)
        return result.wall_s

    try:
        wall = common.alternate({"lmforge": lambda: run("lmforge", lmforge_cmd, ours),
                                 "peer": lambda: run("peer", peer_cmd, peer)}, args.repeats)
        same = identical(ours, peer)
        lmforge_imports = heavy_imports(lmforge_cmd, env, ours)
        shutil.rmtree(ours, ignore_errors=True)
        verified = common.run_child(lmforge_cmd[:-1], env=env)  # full export with the fresh-process verification
        common.check_child(verified, "lmforge export with verification")
    finally:
        for out in (ours, peer):
            shutil.rmtree(out, ignore_errors=True)

    peer_name = "DeepSpeed zero_to_fp32 --safe_serialization"
    what = f"{plan.n_params / 1e6:.0f}M-parameter ZeRO-3 checkpoint ({model_gb:.2f} GB fp32, {plan.world_size} ranks)"
    rss_gib = {side: [r / 2**30 for r in runs] for side, runs in rss.items()}
    rows = [
        common.row(f"export time, {what}", "s", wall["lmforge"], wall["peer"], peer_name, better="lower",
                   target=f">= {TIME_TARGET}x", note=f"outputs bit-identical: {'yes' if same else 'NO'}; each side a fresh process, "
                                                     "start-up and imports included; page cache warm"),
        common.row("peak RSS of the export process", "GiB", rss_gib["lmforge"], rss_gib["peer"], peer_name, better="lower",
                   note="ru_maxrss: memory-mapped checkpoint pages count"),
        common.row("peak RSS / fp32 model bytes", "x", [r / model_bytes for r in rss["lmforge"]], target=f"<= {RSS_TARGET}x",
                   note=f"zero_to_fp32: {common.median(rss['peer']) / model_bytes:.2f}x"),
        common.row("export with fresh-process verification", "s", verified.wall_s,
                   note="reload with transformers, probe logits, pipeline; one run"),
    ]
    common.print_rows(rows)
    print(f"peak RSS ratio (lmforge / fp32 model bytes): {rows[2]['lmforge']:.3f} (target <= {RSS_TARGET}; "
          f"zero_to_fp32: {common.median(rss['peer']) / model_bytes:.3f})")
    print(f"time ratio (lmforge / zero_to_fp32): {1 / rows[0]['ratio']:.3f} (target <= {TIME_TARGET}; "
          f"{rows[0]['lmforge']:.2f} s vs {rows[0]['peer']:.2f} s, median of {len(wall['lmforge'])})")
    print(f"outputs bit-identical: {same}; full export with fresh-process verification: {verified.wall_s:.1f} s")
    details = {"checkpoint": str(tag_dir), "preset": args.preset, "zero_stage": plan.zero_stage,
               "world_size": plan.world_size, "n_params": plan.n_params, "fp32_model_bytes": model_bytes,
               "repeats": args.repeats, "outputs_identical": same, "sides": SIDES,
               "load_average_1_5_15_min_at_start": load_at_start, "lmforge_heavy_imports": lmforge_imports,
               "peak_rss_bytes": rss, "export_with_verification_peak_rss_bytes": verified.peak_rss_bytes}
    common.write_result("bench_export", "Export of a ZeRO-3 checkpoint vs DeepSpeed zero_to_fp32", rows, details,
                        copy_to=args.json)
    if not same:
        print("the two exports differ: the comparison is void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
