"""Helpers to start real training ranks (``python -m lmforge train``) as separate processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.local import rank_env
from lmforge_common import free_port

TINY = ["model.preset=llama-test", "deepspeed.micro_batch_size=2", "data.eval_batches=1", "log_every_steps=1",
        "show_progress=false", "optim.warmup_steps=2", "optim.lr=3e-3", "seed=11"]


class Ranks:
    """``nproc`` training processes of one run; ``wait()`` returns their exit codes."""

    def __init__(self, config: Path, nproc: int, overrides: list[str], log_dir: Path, cwd: Path | None = None,
                 preexec_fn=None):
        port = free_port()
        threads = max(1, (os.cpu_count() or 1) // nproc)
        self.procs = []
        self.log_dir = log_dir
        for r in range(nproc):
            env = {**os.environ, "DS_ACCELERATOR": "cpu", **rank_env(r, nproc, "127.0.0.1", port, threads)}
            log = open(log_dir / f"rank{r}.log", "ab")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "lmforge", "train", str(config), *overrides],
                                               env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                               preexec_fn=preexec_fn))
            log.close()

    def logs(self) -> list[str]:
        """Each rank's output so far (stdout and stderr together), rank 0 first."""
        return [(self.log_dir / f"rank{r}.log").read_text() for r in range(len(self.procs))]

    def wait(self, timeout_s: float = 300) -> list[int]:
        """Each rank's exit code; a rank killed by a signal (negative code) has its log's tail printed, which
        pytest shows with a failing assertion (a flaky abort must leave more than its exit code behind)."""
        try:
            codes = [p.wait(timeout=timeout_s) for p in self.procs]
            for rank, code in enumerate(codes):
                if code < 0:
                    tail = (self.log_dir / f"rank{rank}.log").read_text(errors="replace").splitlines()[-40:]
                    print(f"--- rank {rank} exited {code}; the last lines of its log:", *tail, sep="\n")
            return codes
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()


@pytest.fixture
def start_run(tmp_path, tokenizer_dir, prepared_dir):
    """``start_run(run_name, nproc, *overrides) -> Ranks`` for a tiny run on the session's prepared data."""
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  path: {prepared_dir}\n  tokenizer: {tokenizer_dir}\n")

    def start(run_name: str, nproc: int, *overrides: str) -> Ranks:
        run_dir = tmp_path / run_name
        run_dir.mkdir(exist_ok=True)
        return Ranks(config, nproc, [*TINY, f"run_dir={run_dir}", *overrides], run_dir)

    return start


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Training loss per step from metrics.jsonl; a step logged twice (before a kill and after resume) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def samples_by_step(run_dir: Path) -> dict[int, set[int]]:
    """Sample indices read per step, over all ranks, from data-indices/rank*.tsv (last occurrence wins)."""
    out: dict[int, set[int]] = {}
    for path in sorted((run_dir / "data-indices").glob("rank*.tsv")):
        seen_here: dict[int, set[int]] = {}
        for line in path.read_text().splitlines():
            step_text, ids_text = line.split("\t")
            seen_here.setdefault(int(step_text), set()).update(int(i) for i in ids_text.split(","))
        for step, ids in seen_here.items():
            out.setdefault(step, set()).update(ids)
    return out
