"""Peak resident memory of every training rank: run ``lmforge launch local`` and sample /proc.

    python bench/memory_plan.py --preset llama-350m --zero-stage 3 --nproc 4 [--out result.json] [key=value ...]

Each rank's ``VmHWM`` (the kernel's peak resident set size of the process, bytes) and ``VmRSS`` are read
from ``/proc/<pid>/status`` every ``--interval-s`` seconds for every ``lmforge train`` process below the
launcher (its rank read from ``/proc/<pid>/environ``); the last ``VmHWM`` seen before a rank exits is its
peak (growth within the last interval is missed). The run: micro batch 1, ``--max-steps`` steps, fp32... as
given, on the stdlib slice prepared by :func:`common.bench_data` (a 2048-token byte-level BPE, 256-token
sequences). ``--force`` is passed so that a run the memory plan refuses is measured anyway (``--no-force``: the
launcher's own verdict and its wall time are recorded instead). Prints one JSON
object (and writes it to ``--out``): per-rank peaks in bytes, the plan's per-rank figure, the exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import common  # noqa: E402  (bench/ is on sys.path when a bench script runs, as for the others)

CORPUS = tuple(str(Path(sysconfig.get_paths()["stdlib"]) / name) for name in ("json", "email", "asyncio"))
"""About 0.9 MB of the standard library: enough sequences for a few steps."""


def _status_bytes(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # kB
    return out


def _rank_processes() -> dict[int, int]:
    """``{pid: rank}`` of every live ``lmforge train`` process that has a RANK variable."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if b"lmforge" not in cmdline or b"train" not in cmdline:
                continue
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:  # gone, or not ours
            continue
        if b"RANK" in env and env.get(b"LMFORGE_MEMORY_PLAN_RUN") == os.environ["LMFORGE_MEMORY_PLAN_RUN"].encode():
            found[int(entry.name)] = int(env[b"RANK"])
    return found


def measure(command: list[str], env: dict[str, str], interval_s: float) -> tuple[int, dict[int, dict[str, int]], str]:
    """Run ``command``; ``(exit code, {rank: {"VmHWM": bytes, "VmRSS": max bytes}}, output tail)``."""
    peaks: dict[int, dict[str, int]] = {}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            for pid, rank in _rank_processes().items():
                try:
                    now = _status_bytes(pid)
                except OSError:
                    continue
                seen = peaks.setdefault(rank, {"VmHWM": 0, "VmRSS": 0})
                for key, value in now.items():
                    seen[key] = max(seen[key], value)
            time.sleep(interval_s)
        log.seek(0)
        return proc.returncode, peaks, log.read().decode(errors="replace")[-3000:]


def _plan(config: Path, overrides: list[str], nproc: int, env: dict[str, str]) -> dict | None:
    plan = subprocess.run(common.lmforge_cmd("plan", str(config), *overrides, "--nproc", str(nproc), "--json"),
                          env=env, capture_output=True, text=True, check=False)
    return json.loads(plan.stdout) if plan.returncode in (0, 2) and plan.stdout.strip() else None


def launch_inputs(tmp: Path, preset: str, zero_stage: int, max_steps: int, extra: list[str]) -> tuple[Path, list[str]]:
    """The training config (in ``tmp``) and overrides of one measured launch: the bench's stdlib slice with a
    2048-token tokenizer, micro batch 1, one evaluation batch, the run dir in ``tmp``."""
    # prep's default validation fraction holds out no document of this small corpus: 5 of 67, as the trainer advises
    tok, data = common.bench_data(name="memplan-val", corpus=CORPUS, vocab_size=2048, seq_len=256,
                                  prep_args=("--val-fraction", "0.075"))
    config = tmp / "train.yaml"
    config.write_text(f"data:\n  path: {data}\n  tokenizer: {tok}\n")
    return config, [f"model.preset={preset}", f"deepspeed.zero_stage={zero_stage}", "deepspeed.micro_batch_size=1",
                    f"max_steps={max_steps}", "data.eval_batches=1", "show_progress=false", f"run_dir={tmp / 'run'}",
                    "checkpoint.keep_last=1", *extra]


def replan(path: Path) -> int:
    """``--replan``: the stored result with its ``plan`` recomputed by this checkout (``replanned`` records when)."""
    result = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        config, overrides = launch_inputs(Path(tmp), result["preset"], result["zero_stage"], result["max_steps"],
                                          result["overrides"])
        result["plan"] = _plan(config, overrides, result["nproc"], {**os.environ, **common.python_env(),
                                                                    "DS_ACCELERATOR": "cpu"})
    result["replanned"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{path}: plan {result['plan'] and result['plan']['per_rank_bytes']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-350m")
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--interval-s", type=float, default=0.2)
    parser.add_argument("--out", default="")
    parser.add_argument("--no-force", dest="force", action="store_false",
                        help="launch without --force: record whether (exit 2) and how fast the plan refuses up front")
    parser.add_argument("--replan", default="",
                        help="a result JSON: run `lmforge plan` again for its launch with this checkout and store it as "
                             "its plan (the plan model changed, the measurement did not); no training")
    parser.add_argument("overrides", nargs="*", help="more training overrides, key=value")
    args = parser.parse_args(argv)
    if args.replan:
        return replan(Path(args.replan))
    with tempfile.TemporaryDirectory() as tmp:
        config, overrides = launch_inputs(Path(tmp), args.preset, args.zero_stage, args.max_steps, args.overrides)
        env = {**os.environ, **common.python_env(), "DS_ACCELERATOR": "cpu", "LMFORGE_MEMORY_PLAN_RUN": str(os.getpid())}
        os.environ["LMFORGE_MEMORY_PLAN_RUN"] = env["LMFORGE_MEMORY_PLAN_RUN"]
        start = time.perf_counter()
        force = ["--force"] if args.force else []
        code, peaks, tail = measure(common.lmforge_cmd("launch", "local", "--nproc", str(args.nproc), *force,
                                                       str(config), *overrides), env, args.interval_s)
        wall_s = round(time.perf_counter() - start, 1)  # the launch alone, not the plan recomputed below
        plan = _plan(config, overrides, args.nproc, env)
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": common.source_commit(),
              "machine": common.machine_info(), "versions": common.library_versions(),
              "preset": args.preset, "zero_stage": args.zero_stage, "nproc": args.nproc, "max_steps": args.max_steps,
              "overrides": args.overrides, "forced": args.force, "exit_code": code, "wall_s": wall_s,
              "peak_rss_bytes": {r: peaks[r]["VmHWM"] for r in sorted(peaks)},
              "max_peak_rss_bytes": max((p["VmHWM"] for p in peaks.values()), default=0),
              "plan": plan}
    if code != 0:
        result["output_tail"] = tail
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if code == 0 or (code == 2 and not args.force) else 1


if __name__ == "__main__":
    sys.exit(main())
