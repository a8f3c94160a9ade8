"""Export speed and memory: ``lmforge export`` against DeepSpeed's ``zero_to_fp32`` over checkpoint sizes,
ZeRO stages and export dtypes, with and without lmforge's verification, and ``t = a + b * GB`` fitted per tool.

Targets (issue 8): lmforge's peak RSS at most 0.6x the fp32 model bytes; its time (without verification, the
peer does none) at most 1.0x the peer's (ratio >= 1.0x below, where a ratio above 1 means lmforge is faster).

1. Builds once per (preset, ZeRO stage), cached in ``--work`` (default ``bench/.cache/export``, git-ignored),
   a real checkpoint with the real trainer: 2 CPU ranks, fp32 training, micro batch 1, one optimizer step
   (so the files also hold Adam moments, as a real checkpoint does), a 512-token byte-level BPE (the
   embedding is then a negligible part of the model). Reruns reuse it. About 16 bytes per parameter on
   disk: 2 GB for llama-125m, 5 GB for llama-350m, 16 GB for llama-1b.
2. Before every timed run, reads the checkpoint files, so that no run pays for a page cache that another
   side's output (4.9 GB for llama-1b) pushed the checkpoint out of.
3. Runs, alternating (``common.alternate``), ``--repeats`` rounds of three fresh processes, each timed with
   its interpreter start-up and imports (:data:`SIDES` says what each does): ``lmforge export --no-verify``,
   ``lmforge export`` (verified: the default), and the peer: ``python -m deepspeed.utils.zero_to_fp32 ...
   --safe_serialization`` for fp32, DeepSpeed's public ``convert_zero_checkpoint_to_state_dict(...,
   dtype="bf16", safe_serialization=True)`` for bf16 (its CLI has no dtype option). Each output folder is
   deleted, and the dirty pages of earlier writes flushed (``os.sync``), before its run, outside the timing.
   Wall time and the child's peak RSS (``os.wait4``) are recorded; medians are compared, with the range of the
   per-round ratios.
4. Checks that lmforge's and the peer's safetensors hold the same tensors, bit for bit (exit 1 when not).
5. With two or more sizes at one (ZeRO stage, dtype), fits ``wall_s = a + b * GB`` per round (least squares,
   ``common.line_fits``; GB = the fp32 master weights, 1e9 bytes): ``a`` is the fixed cost (start-up, imports,
   verification's model build), ``1 / b`` the GB/s once started.

Default (``make bench``): llama-350m at ZeRO 3, fp32 and bf16. ``--full`` (``make bench-full``, to
``bench_export_full.json``): :data:`FULL_GRID` x fp32, bf16. llama-1b at ZeRO 2 is left out: DeepSpeed's
ZeRO-2 training keeps whole fp32 parameters and gradients on every rank, and ``lmforge plan`` puts 2 ranks
at 20-25 GiB each, on a 23.5 GiB machine; ZeRO 3 fits.

Usage: ``python bench/bench_export.py [--full] [--work bench/.cache/export] [--repeats 3] [--json FILE]``.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import common

RSS_TARGET = 0.6
RSS_TARGET_MIN_BYTES = 10**9
"""The RSS target holds for models of at least this many fp32 bytes (issue 8): below, the interpreter and its
imports (torch for a cast to bf16) are most of the resident set."""
TIME_TARGET = 1.0
DEFAULT_GRID = (("llama-350m", 3),)
FULL_GRID = (("llama-125m", 2), ("llama-125m", 3), ("llama-350m", 2), ("llama-350m", 3), ("llama-1b", 3))
"""(preset, ZeRO stage) checkpoints of ``--full``: the largest this 2-core, 23.5 GiB machine can save on 2 ranks."""
DTYPES = ("fp32", "bf16")
PEER_NAMES = {"fp32": "DeepSpeed zero_to_fp32 --safe_serialization",
              "bf16": "DeepSpeed convert_zero_checkpoint_to_state_dict(dtype=bf16, safe_serialization=True)"}
SIDES = {
    "lmforge": "python -m lmforge export TAG OUT --overwrite --no-verify --dtype D: interpreter start-up and imports "
               "(the fp32 path imports neither torch, DeepSpeed nor transformers), checks of the run (state, tokenizer "
               "and data fingerprints), the checkpoint structure from the files' pickles, model.safetensors (fp32: "
               "tensors copied as stored, os.copy_file_range; bf16: cast tensor by tensor), config.json, "
               "generation_config.json, tokenizer files, loss curve (matplotlib), model card, lmforge_export.json, "
               "rename of OUT.tmp to OUT",
    "verified": "python -m lmforge export TAG OUT --overwrite --dtype D (the default): the same, then a fresh process "
                "reloads OUT with transformers, compares logits with the checkpoint's probe and runs the pipeline",
    "peer": "fp32: python -m deepspeed.utils.zero_to_fp32 RUN/checkpoints OUT --tag TAG --safe_serialization; bf16: "
            "python -c 'deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_state_dict(RUN/checkpoints, OUT, "
            "dtype=\"bf16\", safe_serialization=True, tag=TAG)' (the function the CLI calls; the CLI has no dtype). "
            "Interpreter start-up, torch + DeepSpeed imports, torch.load of every rank's files (mmap), consolidation in "
            "memory, model.safetensors via safetensors.torch.save_file, 5GB shards (weights only: no config, "
            "tokenizer or card)",
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


def build_inputs(work: Path) -> Path:
    """A 512-token byte-level BPE and the stdlib ``json`` package prepared at seq_len 64, built once under ``work``
    by ``lmforge tokenizer train`` and ``lmforge prep`` in child processes (this process stays small: see
    :func:`rss_floor_bytes`)."""
    def build(tmp: Path) -> None:
        corpus, env = str(Path(sysconfig.get_paths()["stdlib"]) / "json"), common.python_env()
        for what, args in (("tokenizer train", ("tokenizer", "train", "--input", corpus, "--output", str(tmp / "tokenizer"),
                                                "--vocab-size", "512")),
                           ("prep", ("prep", "--input", corpus, "--tokenizer", str(tmp / "tokenizer"), "--output",
                                     str(tmp / "data"), "--seq-len", "64", "--val-fraction", "0.2"))):
            common.check_child(common.run_child(common.lmforge_cmd(*args), env=env), what)

    return common.cached_build(work / "inputs-v512-s64", build)


def rss_floor_bytes() -> int:
    """This process's peak RSS: a child's ``ru_maxrss`` starts from its parent's resident set at ``fork`` (Linux
    carries the high-water mark across ``exec``), so no child's figure below reads lower than this."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_checkpoint(work: Path, preset: str, zero_stage: int) -> Path:
    """A ZeRO-``zero_stage`` fp32 checkpoint of ``preset`` trained one step by ``lmforge train`` on 2 local ranks;
    returns its folder. Reuses the newest complete checkpoint of ``work/run-<preset>-z<stage>`` (a checkpoint
    counts once its state file is written, after every rank's files)."""
    from launch.local import run_local
    from pretrain.checkpoint import latest_complete

    run = work / f"run-{preset}-z{zero_stage}"
    done = latest_complete(run / "checkpoints")
    if done is not None:
        return done
    inputs = build_inputs(work)
    print(f"building a ZeRO-{zero_stage} fp32 checkpoint of {preset} on 2 CPU ranks -> {run} (once; reruns reuse it)",
          flush=True)
    config = work / "train.yaml"
    config.write_text(f"data:\n  path: {inputs / 'data'}\n  tokenizer: {inputs / 'tokenizer'}\n")
    run_local([sys.executable, "-m", "lmforge", "train", str(config), f"run_dir={run}", f"model.preset={preset}",
               f"deepspeed.zero_stage={zero_stage}", "deepspeed.precision=fp32", "deepspeed.micro_batch_size=1",
               "max_steps=1", "data.eval_batches=1", "show_progress=false"], 2,
              env={**common.python_env(), "DS_ACCELERATOR": "cpu"})
    tag = latest_complete(run / "checkpoints")
    assert tag is not None, f"{run}: the training run saved no checkpoint"
    return tag


def identical(a: Path, b: Path) -> bool:
    """Same tensor names, dtypes and bytes in the safetensors of two folders, compared by a child process
    (``--compare A B``: torch stays out of this one, see :func:`rss_floor_bytes`)."""
    result = common.run_child([sys.executable, __file__, "--compare", str(a), str(b)], env=common.python_env())
    if result.returncode not in (0, 1):
        raise RuntimeError(f"comparing {a} with {b} failed (exit {result.returncode}):\n{result.output[-3000:]}")
    return result.returncode == 0


def compare(a: Path, b: Path) -> int:
    """Exit status of ``--compare A B``: 0 when the two folders' safetensors hold the same tensors bit for bit
    (names, dtypes, bytes; one tensor in memory at a time), else 1."""
    import torch
    from safetensors import safe_open

    def handles(folder: Path) -> dict:
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            f = safe_open(str(path), framework="pt")
            out.update({k: f for k in f.keys()})
        return out

    ha, hb = handles(a), handles(b)
    same = bool(ha) and set(ha) == set(hb) and all(
        (x := ha[k].get_tensor(k)).dtype == (y := hb[k].get_tensor(k)).dtype and torch.equal(x, y) for k in ha)
    return 0 if same else 1


def commands(tag_dir: Path, dtype: str, ours: Path, verified: Path, peer: Path) -> dict[str, list[str]]:
    """The three timed command lines of :data:`SIDES` for one checkpoint and export dtype."""
    lmforge = common.lmforge_cmd("export", str(tag_dir), str(ours), "--overwrite", "--no-verify", "--dtype", dtype)
    if dtype == "fp32":
        peer_cmd = [sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(tag_dir.parent), str(peer), "--tag",
                    tag_dir.name, "--safe_serialization"]
    else:
        code = ("import sys; from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict as c; "
                "c(sys.argv[1], sys.argv[2], dtype=sys.argv[4], safe_serialization=True, tag=sys.argv[3])")
        peer_cmd = [sys.executable, "-c", code, str(tag_dir.parent), str(peer), tag_dir.name, dtype]
    return {"lmforge": lmforge,
            "verified": common.lmforge_cmd("export", str(tag_dir), str(verified), "--overwrite", "--dtype", dtype),
            "peer": peer_cmd}


def measure(tag_dir: Path, dtype: str, work: Path, repeats: int) -> dict:
    """Alternating rounds of the three sides on one checkpoint: wall seconds and peak RSS bytes per side and
    round, whether lmforge's and the peer's tensors are identical, and the checkpoint's size."""
    from pretrain.export.consolidate import plan_checkpoint

    plan = plan_checkpoint(tag_dir)
    outs = {side: work / f"out-{side}" for side in SIDES}
    cmds = commands(tag_dir, dtype, outs["lmforge"], outs["verified"], outs["peer"])
    env = common.python_env(**common.CPU_ONLY_ENV)
    rss: dict[str, list[int]] = {side: [] for side in SIDES}

    def run(side: str) -> float:
        shutil.rmtree(outs[side], ignore_errors=True)
        os.sync()  # earlier outputs written back now: no run pays for another's dirty pages
        warm_page_cache(tag_dir)  # and none for the checkpoint pages another's output pushed out of the cache
        result = common.run_child(cmds[side], env=env)
        common.check_child(result, f"{side} export ({tag_dir}, {dtype})")
        rss[side].append(result.peak_rss_bytes)
        if side == "verified":  # not compared: its pages would only crowd the checkpoint's
            shutil.rmtree(outs[side], ignore_errors=True)
        return result.wall_s

    try:
        wall = common.alternate({side: functools.partial(run, side) for side in SIDES}, repeats)
        same = identical(outs["lmforge"], outs["peer"])
        imports = heavy_imports(cmds["lmforge"], env, outs["lmforge"])
    finally:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return {"checkpoint": str(tag_dir), "dtype": dtype, "zero_stage": plan.zero_stage, "world_size": plan.world_size,
            "n_params": plan.n_params, "fp32_model_bytes": sum(t.numel for t in plan.tensors) * 4, "wall_s": wall,
            "peak_rss_bytes": rss, "outputs_identical": same, "lmforge_heavy_imports": imports}


def label(m: dict) -> str:
    return (f"{m['n_params'] / 1e6:.0f}M params ({m['fp32_model_bytes'] / 1e9:.2f} GB fp32), ZeRO-{m['zero_stage']}, "
            f"{m['world_size']} ranks, to {m['dtype']}")


def config_rows(m: dict, tag: str) -> list[dict]:
    """Time without and with verification against the peer, and peak RSS, for one measured configuration."""
    peer, wall, rss = PEER_NAMES[m["dtype"]], m["wall_s"], m["peak_rss_bytes"]
    gib = {side: [r / 2**30 for r in runs] for side, runs in rss.items()}
    same = f"tensors bit-identical to the peer's: {'yes' if m['outputs_identical'] else 'NO'}"
    return [
        common.row(f"export time, {label(m)}, no verification", "s", wall["lmforge"], wall["peer"], peer,
                   better="lower", target=f">= {TIME_TARGET}x",
                   note=f"{same}; fresh processes, start-up and imports included; page cache warm {tag}".strip()),
        common.row(f"export time with verification (the default), {label(m)}", "s", wall["verified"], wall["peer"], peer,
                   better="lower", note=f"lmforge reloads the export with transformers in a fresh process and checks "
                                        f"the probe logits; the peer verifies nothing {tag}".strip()),
        common.row(f"peak RSS of the export process, {label(m)}", "GiB", gib["lmforge"], gib["peer"], peer,
                   better="lower", note=f"ru_maxrss, no verification (memory-mapped checkpoint pages count; "
                                        "floor: the bench process's own RSS, details.rss_floor_bytes); lmforge "
                                        f"{common.median(rss['lmforge']) / m['fp32_model_bytes']:.3f}x the fp32 model "
                                        f"bytes {tag}".strip()),
    ]


def gb_per_s(fits: list[tuple[float, float]]) -> str:
    """``1 / b`` of the median per-GB cost ``b`` of :func:`common.line_fits` lines, as text."""
    b = common.median([b for _, b in fits])
    return f"{1 / b:.2f} GB/s" if b > 0 else "no per-GB cost above the noise"


def fit_rows(measured: list[dict], tag: str) -> list[dict]:
    """``t = a + b * GB`` per tool, round by round, for each (ZeRO stage, dtype) measured at two or more sizes."""
    rows = []
    for stage, dtype in sorted({(m["zero_stage"], m["dtype"]) for m in measured}):
        group = sorted((m for m in measured if (m["zero_stage"], m["dtype"]) == (stage, dtype)),
                       key=lambda m: m["fp32_model_bytes"])
        if len(group) < 2:
            continue
        gbs = [m["fp32_model_bytes"] / 1e9 for m in group]
        what = f"ZeRO-{stage} to {dtype}, {', '.join(f'{x:.2f}' for x in gbs)} GB fp32"
        fits = {side: common.line_fits(gbs, [m["wall_s"][side] for m in group]) for side in SIDES}
        for side, name in (("lmforge", "no verification"), ("verified", "with verification")):
            rows += [
                common.row(f"fixed cost a of t = a + b * GB, {what}, {name}", "s", [a for a, _ in fits[side]],
                           [a for a, _ in fits["peer"]], PEER_NAMES[dtype], better="lower",
                           note=f"least squares per round over the sizes {tag}".strip()),
                common.row(f"cost per GB b of t = a + b * GB, {what}, {name}", "s/GB", [b for _, b in fits[side]],
                           [b for _, b in fits["peer"]], PEER_NAMES[dtype], better="lower",
                           note=f"1 / b, once started: lmforge {gb_per_s(fits[side])}, peer {gb_per_s(fits['peer'])} "
                                f"{tag}".strip()),
            ]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(common.CACHE_DIR / "export"), help="cache folder for checkpoints and outputs")
    p.add_argument("--full", action="store_true", help="every checkpoint of FULL_GRID (make bench-full), to "
                                                       "bench_export_full.json")
    p.add_argument("--repeats", type=int, default=common.MIN_REPEATS, help="alternating rounds (>= 3)")
    p.add_argument("--json", default=None, help="also write the result JSON here")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compare:
        return compare(Path(args.compare[0]), Path(args.compare[1]))
    common.use_this_checkout()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    grid = FULL_GRID if args.full else DEFAULT_GRID
    tag = "(bench-full)" if args.full else ""
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    checkpoints = {(preset, stage): build_checkpoint(work, preset, stage) for preset, stage in grid}
    measured = []
    for (preset, stage), tag_dir in checkpoints.items():
        for dtype in DTYPES:
            print(f"export: {preset}, ZeRO-{stage}, to {dtype}", flush=True)
            measured.append({"preset": preset, **measure(tag_dir, dtype, work, args.repeats)})
    floor = rss_floor_bytes()
    rows = [r for m in measured for r in config_rows(m, tag)] + fit_rows(measured, tag)
    large = [m for m in measured if m["fp32_model_bytes"] >= RSS_TARGET_MIN_BYTES]
    if large:
        worst = max(large, key=lambda m: common.median(m["peak_rss_bytes"]["lmforge"]) / m["fp32_model_bytes"])
        rows.append(common.row("largest peak RSS / fp32 model bytes, models of 1 GB or more", "x",
                               [r / worst["fp32_model_bytes"] for r in worst["peak_rss_bytes"]["lmforge"]],
                               target=f"<= {RSS_TARGET}x", note=f"at {label(worst)} {tag}".strip()))
    common.print_rows(rows)
    details = {"grid": [list(g) for g in grid], "dtypes": list(DTYPES), "repeats": args.repeats, "sides": SIDES,
               "load_average_1_5_15_min_at_start": load_at_start, "configurations": measured,
               "rss_floor_bytes": floor,
               "training": "fp32, 2 CPU ranks, micro batch 1, one optimizer step, 512-token vocabulary, seq_len 64",
               "left_out": "llama-1b at ZeRO 2: lmforge plan puts 2 ranks at 20.9 GiB (bf16) to 24.9 GiB (fp32) "
                           "each, on a 23.5 GiB machine"}
    name, title = (("bench_export_full", "Export (bench-full) by size, ZeRO stage and dtype vs DeepSpeed zero_to_fp32")
                   if args.full else ("bench_export", "Export of a ZeRO-3 checkpoint vs DeepSpeed zero_to_fp32"))
    common.write_result(name, title, rows, details, copy_to=args.json)
    differ = [label(m) for m in measured if not m["outputs_identical"]]
    if differ:
        print(f"lmforge's and the peer's tensors differ at {'; '.join(differ)}: those comparisons are void",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
