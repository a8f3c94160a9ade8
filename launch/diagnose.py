"""Why a rank died: one line for the launcher, the details for the rank's log.

A rank killed by a signal leaves no Python traceback. The launcher then says, in one line, which
signal, which rank on which node, the last optimizer step it completed (its heartbeat file, the
contract of :func:`lmforge_common.read_heartbeat`), and for SIGKILL (what the kernel's
out-of-memory killer sends) that the OOM killer is the likely cause, with the rank's last sampled
resident set size and the node's memory. The details (heartbeat, RSS samples, ``/proc/meminfo``)
go to ``run_dir/launch/rank{r}-death.json`` and to the rank's log.

The local launcher samples each rank's RSS itself (:func:`rss_bytes`). Under mpirun and srun the
launcher is not the ranks' parent, so each rank runs under this module's watcher
(``python -m launch.diagnose --run-dir D -- CMD ...``): it starts the command, samples its RSS, and
when the command dies from a signal prints the line (to its stdout: the rank's log under Slurm,
mpirun's output under MPI), writes the details, then dies from the same signal itself so mpirun
and srun see the same exit status and stop the other ranks as before.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from lmforge_common import read_heartbeat, write_json_atomic

DEATHS_DIR = "launch"
"""Run-dir folder of the death reports: ``launch/rank{r}-death.json``."""

RSS_SAMPLE_EVERY_S = 1.0
"""Seconds between the watcher's RSS samples of its rank."""

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
"""Signals the watcher catches and only notes: srun signals every process of the step, and mpirun's daemon the
rank's whole process group, so the rank gets them directly (passing them on would deliver them twice). A rank
that then dies from one of them was stopped, not crashed, and is not reported."""

LINE_PREFIX = "lmforge: rank"
"""Start of every diagnosis line (the Slurm batch script collects the lines from the rank logs by it)."""


def rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` in bytes (``VmRSS`` of ``/proc/PID/status``); None when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB = KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def node_memory() -> dict[str, int]:
    """``MemTotal`` / ``MemAvailable`` of this node from ``/proc/meminfo``, in bytes (empty when unreadable)."""
    try:
        rows = (line.split() for line in Path("/proc/meminfo").read_text().splitlines())
        return {r[0].rstrip(":"): int(r[1]) * 1024 for r in rows if r and r[0] in ("MemTotal:", "MemAvailable:")}
    except (OSError, ValueError, IndexError):
        return {}


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"


def death_line(rank: int, world_size: int | None, node: str, signum: int, step: int | None,
               rss: int | None, memory: dict[str, int]) -> str:
    """The one line naming the signal, rank, node and last completed step (+ the OOM hint for SIGKILL)."""
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
    of = f" of {world_size}" if world_size else ""
    after = f"after completing step {step}" if step is not None else "before completing any step (no heartbeat)"
    line = f"{LINE_PREFIX} {rank}{of} on node {node} was killed by {name} {after}"
    if signum == signal.SIGKILL:
        line += (f"; likely the out-of-memory killer: its last sampled RSS was {_gib(rss)}, node memory "
                 f"{_gib(memory.get('MemAvailable'))} available of {_gib(memory.get('MemTotal'))}")
    return line


def report_death(run_dir: str | Path | None, rank: int, world_size: int | None, signum: int,
                 rss_samples: Sequence[int], node: str | None = None) -> str:
    """Build the line for ``rank`` killed by ``signum``, write the details file (when ``run_dir``); return the line.

    ``rss_samples``: the rank's sampled RSS in bytes, oldest first. The heartbeat (if any) supplies the
    last completed step and, where the launcher does not know it, the node.
    """
    beat = read_heartbeat(run_dir, rank) if run_dir else None
    node = node or (beat or {}).get("host") or socket.gethostname()
    memory = node_memory()
    rss = rss_samples[-1] if rss_samples else None
    line = death_line(rank, world_size, node, signum, (beat or {}).get("step"), rss, memory)
    if run_dir:
        details = {"line": line, "rank": rank, "node": node, "signal": signum, "heartbeat": beat,
                   "last_rss_bytes": rss, "peak_rss_bytes": max(rss_samples, default=None),
                   "rss_samples": len(rss_samples), "node_memory_bytes": memory, "time_unix_s": time.time()}
        death_path(run_dir, rank).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(death_path(run_dir, rank), details)
    return line


def death_path(run_dir: str | Path, rank: int) -> Path:
    """Where the death report of ``rank`` goes."""
    return Path(run_dir) / DEATHS_DIR / f"rank{rank}-death.json"


def death_lines(run_dir: str | Path | None, since_unix_s: float) -> list[str]:
    """The lines of the death reports in ``run_dir`` written after ``since_unix_s``, by rank."""
    if not run_dir:
        return []
    found = []
    for path in (Path(run_dir) / DEATHS_DIR).glob("rank*-death.json"):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if report.get("time_unix_s", 0) >= since_unix_s:
            found.append((report.get("rank", 0), report["line"]))
    return [line for _, line in sorted(found)]


def _env_rank() -> tuple[int, int | None]:
    """(rank, world size) from the launcher's environment (OpenMPI, Slurm, or torchrun-style)."""
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
                               ("RANK", "WORLD_SIZE")):
        if rank_var in os.environ:
            size = os.environ.get(size_var)
            return int(os.environ[rank_var]), int(size) if size else None
    return 0, None


def watch(command: Sequence[str], run_dir: str | None) -> int:
    """Run ``command``, sampling its RSS; returns its exit code, or reports its death and dies from the same signal.

    A rank that dies from a signal the watcher received too (:data:`HANDLED_SIGNALS`) was stopped from outside
    and dies silently, with the same signal.
    """
    rank, world_size = _env_rank()
    proc = subprocess.Popen(list(command))
    received: set[int] = set()

    def on_signal(signum: int, frame: object) -> None:
        received.add(signum)

    for s in HANDLED_SIGNALS:
        signal.signal(s, on_signal)
    samples: list[int] = []
    while proc.poll() is None:
        rss = rss_bytes(proc.pid)
        if rss is not None:
            samples.append(rss)
            del samples[:-1000]
        try:
            proc.wait(timeout=RSS_SAMPLE_EVERY_S)
        except subprocess.TimeoutExpired:
            pass
    code = proc.returncode
    time.sleep(0.1 if code < 0 else 0)  # a teardown signal sent to the whole step may still be arriving here
    if code >= 0:
        return code
    if -code not in received:  # else the launcher or scheduler stopped this rank (the teardown after another's death)
        # the node as the scheduler names it (Slurm), else the heartbeat's host
        line = report_death(run_dir, rank, world_size, -code, samples, node=os.environ.get("SLURMD_NODENAME"))
        print(line, flush=True)
        if run_dir:
            print(f"lmforge: details of rank {rank}'s death in {death_path(run_dir, rank)}", flush=True)
    _die_like(-code)
    return 128 - code  # a signal that did not end the watcher: exit as a shell would


def _die_like(signum: int) -> None:
    """End this process with ``signum``, as the rank ended (its default action; SIGKILL cannot be caught anyway)."""
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m launch.diagnose [--run-dir D] -- CMD ...``: run CMD under the watcher."""
    parser = argparse.ArgumentParser(prog="python -m launch.diagnose", description=main.__doc__)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")
    return watch(command, args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
