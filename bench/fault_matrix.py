"""Fault matrix: each fault N times on real 2-rank runs, fault points drawn at random (seeded); does the run survive?

Per case and run: start a run with one injected fault (``debug.*``), let it end, rerun the same command
without the fault, and compare every step's training loss with one uninterrupted reference run
(llama-test, fp32, ZeRO 2, a checkpoint every 2 steps). A run **survives** when the rerun finishes
(exit 0) and every loss equals the reference's bit for bit; **steps lost** counts the steps whose loss is
missing or differs; **time to resume** is from the rerun's start to its first new training step.

Usage: ``python bench/fault_matrix.py [--runs 10] [--seed 20261125] [--steps 8]``; writes
``bench/results/fault_matrix.json`` (``bench/report.py`` renders it into BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's packages (bench/ is on sys.path already)

from common import bench_data, check_child, lmforge_cmd, python_env, run_child, write_result  # noqa: E402

from launch.local import rank_env  # noqa: E402
from lmforge_common import free_port  # noqa: E402
from pretrain.checkpoint import CRASH_POINTS  # noqa: E402

NPROC = 2
TIMEOUT_MINUTES = 0.25
"""distributed.timeout_minutes of every run: a rank left alone (hang, a kill of rank 0 only) ends after it."""
BASE = ["model.preset=llama-test", "deepspeed.micro_batch_size=2", "deepspeed.precision=fp32", "deepspeed.zero_stage=2",
        "data.eval_batches=1", "log_every_steps=1", "show_progress=false", "optim.warmup_steps=2", "optim.lr=3e-3",
        "seed=11", "checkpoint.save_every_steps=2", f"distributed.timeout_minutes={TIMEOUT_MINUTES}"]
CASES = {
    "kill -9 at a random step": lambda rng, steps: [f"debug.kill_at_step={rng.randint(1, steps - 1)}"],
    "kill -9 inside a save": lambda rng, steps: [f"debug.crash_in_save={rng.choice(CRASH_POINTS[1:])}"],
    "SIGTERM at a random step": lambda rng, steps: [f"debug.sigterm_at_step={rng.randint(1, steps - 1)}"],
    "SIGTERM during an evaluation": lambda rng, steps: ["eval_every_steps=2", "debug.sigterm_in_eval=true",
                                                        f"debug.sigterm_at_step={2 * rng.randint(1, steps // 2 - 1)}"],
    "2 non-finite steps in a row": lambda rng, steps: [f"debug.inject_nan_at_steps=[{(k := rng.randint(1, steps - 2))},{k + 1}]",
                                                       "guard.max_consecutive_nonfinite=2"],
    "a rank hangs": lambda rng, steps: [f"debug.hang_at_step={rng.randint(1, steps - 1)}"],
}
"""Case name -> the fault's overrides for one run, drawn from ``rng`` for a run of ``steps`` steps."""


def fault_data() -> tuple[Path, Path]:
    """``(tokenizer, prepared data)``: three standard-library packages (as the tests use), a 512-token byte BPE,
    64-token sequences, 10% of the documents held out for validation; built once under ``bench/.cache``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [str(stdlib / n) for n in ("json", "email", "asyncio")]
    tok, _ = bench_data("faults", corpus, vocab_size=512, seq_len=64)
    data = tok.parent / "data-val10"
    if not (data / "manifest.json").is_file():
        check_child(run_child(lmforge_cmd("prep", "--input", *corpus, "--tokenizer", str(tok), "--output", str(data),
                                          "--seq-len", "64", "--val-fraction", "0.1", "--overwrite"), env=python_env()),
                    "lmforge prep")
    return tok, data


def start(config: Path, run_dir: Path, overrides: list[str]) -> list[subprocess.Popen]:
    """The ``NPROC`` ranks of one ``lmforge train`` of ``run_dir``."""
    port = free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(NPROC):
        env = {**python_env(DS_ACCELERATOR="cpu"), **rank_env(r, NPROC, "127.0.0.1", port, 1)}
        with open(run_dir / f"rank{r}.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "lmforge", "train", str(config), *BASE,
                                           f"run_dir={run_dir}", *overrides], env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait(procs: list[subprocess.Popen], alone_s: float = TIMEOUT_MINUTES * 60 + 10) -> list[int]:
    """Exit codes; a rank still running ``alone_s`` after another ended (a hung rank) is killed."""
    while all(p.poll() is None for p in procs):
        time.sleep(0.2)
    deadline = time.monotonic() + alone_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return [p.wait() for p in procs]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a step logged again after a resume keeps the last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def resume_timed(config: Path, run_dir: Path) -> tuple[int, float]:
    """Rerun without the fault: ``(rank 0's exit code, seconds from start to the first new training record)``."""
    metrics = run_dir / "metrics.jsonl"
    before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    t0 = time.monotonic()
    procs = start(config, run_dir, [])
    first_s = float("nan")
    while procs[0].poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any("loss" in json.loads(line) for line in lines[before:]):
            first_s = time.monotonic() - t0
            break
        time.sleep(0.2)
    return wait(procs)[0], first_s


def one_run(config: Path, run_dir: Path, overrides: list[str], reference: dict[int, float]) -> dict:
    t0 = time.monotonic()
    fault_codes = wait(start(config, run_dir, overrides))
    code, resume_s = resume_timed(config, run_dir)
    got = losses(run_dir)
    lost = sum(got.get(s) != v for s, v in reference.items())
    return {"fault": overrides, "fault_exit_codes": fault_codes, "resume_exit_code": code, "steps_lost": lost,
            "survived": code == 0 and lost == 0, "time_to_resume_s": round(resume_s, 2),
            "wall_s": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per case")
    parser.add_argument("--seed", type=int, default=20261125, help="seed of the fault points")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (max_steps)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="case names (default: all)")
    args = parser.parse_args(argv)
    tok, data = fault_data()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fault_matrix-"))
    config = work / "train.yaml"
    config.write_text(f"data:\n  path: {data}\n  tokenizer: {tok}\nmax_steps: {args.steps}\n")
    assert wait(start(config, work / "reference", [])) == [0] * NPROC, f"reference run failed: see {work / 'reference'}"
    reference = losses(work / "reference")
    rows, details = [], {}
    print(f"{'case':<32} {'runs':>4} {'survived':>8} {'steps lost':>10} {'worst resume s':>14}")
    for name in args.cases:
        runs = [one_run(config, work / f"{name.replace(' ', '_')}-{i}", CASES[name](rng, args.steps), reference)
                for i in range(args.runs)]
        details[name] = runs
        worst = max(r["time_to_resume_s"] for r in runs)
        survived, lost = sum(r["survived"] for r in runs), sum(r["steps_lost"] for r in runs)
        print(f"{name:<32} {len(runs):>4} {survived:>8} {lost:>10} {worst:>14.1f}", flush=True)
        rows.append({"case": name, "runs": len(runs), "survived": survived, "steps_lost": lost, "worst_time_to_resume_s": worst})
    write_result("fault_matrix", "Fault matrix (2 CPU ranks, llama-test, fp32, ZeRO 2)", [],
                 {"cases": rows, "runs": details, "seed": args.seed, "steps": args.steps, "runs_per_case": args.runs,
                  "work_dir": str(work)})
    return 0 if all(r["survived"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
