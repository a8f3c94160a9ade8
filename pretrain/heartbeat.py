"""Per-rank heartbeats (the contract of :data:`lmforge_common.HEARTBEAT_DIR`) and the one line that names the
ranks a timed-out collective waited for.

Each rank rewrites ``heartbeat/rank{r}.json`` atomically when its loop starts (the resumed step) and after
every optimizer step. When a collective times out (``distributed.timeout_minutes``), the ranks that reached
it refresh their heartbeat, wait a moment for each other, and name the ranks that did not arrive: those
whose last finished step is behind the others', or, when all finished the same step (ranks move in
lockstep, so a rank that hangs inside a step leaves the same step as the waiting ones), those whose
heartbeat is older than the timeout.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from lmforge_common import heartbeat_path, read_heartbeat, write_json_atomic
from pretrain.errors import DistributedError

STALL_GRACE_S = 2.0
"""Seconds a rank that caught a timeout waits for the other waiting ranks to refresh their heartbeats."""


class CollectiveTimeout(DistributedError):
    """A collective waited ``distributed.timeout_minutes`` for ranks that did not arrive."""


class Heartbeat:
    """Writes this rank's heartbeat: ``{"rank", "host", "pid", "step", "time_unix_s"}``."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.run_dir, self.rank = Path(run_dir), rank
        self.path = heartbeat_path(run_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step = 0

    def beat(self, step: int) -> None:
        """Record ``step`` optimizer steps finished, now (temp + rename)."""
        self.step = step
        write_json_atomic(self.path, {"rank": self.rank, "host": self.host, "pid": self.pid, "step": step,
                                      "time_unix_s": time.time()})


def is_timeout(err: BaseException) -> bool:
    """A torch.distributed collective timed out (gloo: ``Timed out waiting ...``; NCCL watchdog: ``timeout``)."""
    return isinstance(err, RuntimeError) and ("timed out" in str(err).lower() or "Watchdog caught collective" in str(err))


def stall_message(run_dir: str | Path, world_size: int, timeout_minutes: float, now_s: float | None = None) -> str:
    """One line: the step the collective belonged to and the ranks that did not arrive, from the heartbeats.

    Behind: a rank whose last finished step is below the highest, or with no heartbeat; with none behind, a
    rank whose heartbeat is more than ``timeout_minutes`` old (the waiting ranks refreshed theirs).
    """
    now_s = time.time() if now_s is None else now_s
    beats = {r: read_heartbeat(run_dir, r) for r in range(world_size)}
    steps = {r: (b or {}).get("step", -1) for r, b in beats.items()}
    top = max(steps.values())
    behind = [r for r, s in steps.items() if s < top]
    if not behind:
        behind = [r for r, b in beats.items() if b and now_s - b["time_unix_s"] > timeout_minutes * 60]
    where = ", ".join(f"rank {r} ({_where(beats[r])})" for r in behind)
    who = f"not arrived: {where}" if behind else "no rank's heartbeat is behind or stale (ranks unknown)"
    return (f"step {top + 1}: a collective waited distributed.timeout_minutes={timeout_minutes:g} for ranks that "
            f"did not arrive; {who}; heartbeats in {Path(run_dir) / 'heartbeat'}")


def _where(beat: dict | None) -> str:
    if beat is None:
        return "no heartbeat"
    return f"host {beat['host']} pid {beat['pid']}, last finished step {beat['step']}"


def stall_error(heartbeat: Heartbeat, world_size: int, timeout_minutes: float) -> CollectiveTimeout:
    """After a timeout: refresh this rank's heartbeat, give the other waiting ranks :data:`STALL_GRACE_S`, name the stall."""
    heartbeat.beat(heartbeat.step)
    time.sleep(STALL_GRACE_S)
    return CollectiveTimeout(stall_message(heartbeat.run_dir, world_size, timeout_minutes))
