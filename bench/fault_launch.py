"""One ``lmforge train`` launch of the fault matrix (``bench/fault_matrix.py``) on ``NPROC`` local ranks, and how a
launch is judged: the run settings every launch shares, the launch record (exit codes, new metrics records, log
text, time to the first new step), the newest checkpoint that verifies, and the per-case verdict."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import python_env

from launch.local import rank_env
from lmforge_common import free_port
from pretrain.checkpoint import complete_checkpoints, verify_saved

NPROC = 2
STEPS = 24
TIMEOUT_MINUTES = 0.25
"""distributed.timeout_minutes of every run: a rank left alone (a hang) ends after it."""
BASE = ["model.preset=llama-test", "deepspeed.micro_batch_size=2", "deepspeed.precision=fp32", "deepspeed.zero_stage=2",
        "data.eval_batches=1", "log_every_steps=1", "show_progress=false", "optim.warmup_steps=2", "optim.lr=3e-3",
        "seed=11", "checkpoint.save_every_steps=2", "checkpoint.keep_last=0", "eval_every_steps=2",
        f"distributed.timeout_minutes={TIMEOUT_MINUTES}"]


@dataclass
class Launch:
    """One finished ``lmforge train`` of a run folder: exit codes, its new metrics records and log text, timing."""

    codes: list[int]
    records: list[dict]
    log0: str
    log1: str
    resume_s: float
    """Seconds from the start to the first new loss record (nan: none)."""

    def resumed_from(self) -> int | None:
        marker = "resumed from step_"
        at = self.log0.find(marker)
        return int(self.log0[at + len(marker):at + len(marker) + 8]) if at >= 0 else None

    def losses(self) -> dict[int, float]:
        """Training loss per step logged by this launch before a rollback (a step logged twice keeps the last)."""
        out = {}
        for r in self.records:
            if "rollback_to_step" in r:
                break
            if "loss" in r:
                out[r["step"]] = r["loss"]
        return out


def launch(config: Path, run_dir: Path, overrides: list[str], cwd: Path | None = None, with_run_dir: bool = True,
           base: bool = True) -> Launch:
    """Start the ``NPROC`` ranks of one ``lmforge train CONFIG`` of ``run_dir`` and wait for them: a rank still
    running 2 s after another died by a signal is killed (as ``lmforge launch local`` does), one still running
    10 s after another exited (the hung rank, once the others gave up on it) too."""
    port = free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    logs = [run_dir / f"rank{r}.log" for r in range(NPROC)]
    offsets = [p.stat().st_size if p.exists() else 0 for p in logs]
    args = [*(BASE if base else []), *([f"run_dir={run_dir}"] if with_run_dir else []), *overrides]
    t0 = time.monotonic()
    procs = []
    for r in range(NPROC):
        env = {**os.environ, **python_env(DS_ACCELERATOR="cpu"), **rank_env(r, NPROC, "127.0.0.1", port, 1)}  # HOME: DeepSpeed's built ops
        with open(logs[r], "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "lmforge", "train", str(config), *args], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, cwd=cwd))
    first_s = float("nan")
    ended_at = None
    while any(p.poll() is None for p in procs):
        if first_s != first_s and metrics.exists():
            if any("loss" in json.loads(line) for line in metrics.read_text().splitlines()[before:] if line.strip()):
                first_s = time.monotonic() - t0
        done = [p.returncode for p in procs if p.poll() is not None]
        if done and ended_at is None:
            ended_at = time.monotonic()
        if ended_at is not None:
            grace = 2.0 if any(c < 0 for c in done) else 10.0
            if time.monotonic() - ended_at > grace:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    lines = metrics.read_text().splitlines()[before:] if metrics.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    if first_s != first_s and any("loss" in r for r in records):
        first_s = time.monotonic() - t0  # ended within the last poll
    texts = [p.read_bytes()[o:].decode("utf-8", "replace") for p, o in zip(logs, offsets)]
    return Launch(codes, records, texts[0], texts[1], first_s)


def newest_verified(run_dir: Path) -> int:
    """Step of the newest checkpoint that verifies (checksum), 0 for none: where a resume must start."""
    for step, path in reversed(complete_checkpoints(run_dir / "checkpoints")):
        if verify_saved(path).usable:
            return step
    return 0


@dataclass
class Verdict:
    """One case of one run."""

    fault_ok: bool
    notes: list[str] = field(default_factory=list)
    steps_lost: int = 0
    resume_s: float = float("nan")
    judged: bool = False

    @property
    def survived(self) -> bool:
        return self.fault_ok and self.judged and self.steps_lost == 0 and not self.notes


def judge(verdict: Verdict, nxt: Launch, expected_from: int, reference: dict[int, float], until: int | None = None) -> None:
    """Score ``verdict`` by launch ``nxt``: it resumed from ``expected_from`` and its losses (steps before ``until``)
    equal ``reference``'s; steps from the resume to its last logged step that differ or are missing are lost."""
    verdict.judged = True
    verdict.resume_s = nxt.resume_s
    got = nxt.losses()
    if expected_from and nxt.resumed_from() != expected_from:
        verdict.notes.append(f"resumed from {nxt.resumed_from()}, expected {expected_from}")
    last = max([s for s in got if until is None or s < until], default=expected_from)
    if last <= expected_from:
        verdict.notes.append("no training step after the resume")
        verdict.steps_lost += 1
    verdict.steps_lost += sum(got.get(s) != reference.get(s) for s in range(expected_from + 1, last + 1))
