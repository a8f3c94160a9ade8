"""Local launcher: ``nproc`` processes of one command on this machine, torchrun-style environment.

Each process gets ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` /
``MASTER_ADDR`` / ``MASTER_PORT`` and ``OMP_NUM_THREADS = cores // nproc`` (so ranks do not
oversubscribe the CPU). When one process fails the others are terminated: a dead rank would
otherwise leave its peers blocked in a collective forever. A rank killed by a signal is diagnosed
(:mod:`launch.diagnose`): the launcher samples each rank's RSS while it polls and names the signal,
the rank, the last step of its heartbeat and, for SIGKILL, the likely out-of-memory killer.

Preemption (the contract of :mod:`lmforge_common`): a rank that exits
:data:`~lmforge_common.EXIT_PREEMPTED` has saved a checkpoint together with the others, so they are
left :data:`PREEMPTED_GRACE_S` to exit on their own instead of being terminated, and the launch
ends with :class:`~launch.errors.RanksPreempted`. SIGTERM and SIGUSR1 sent to the launcher are
passed on to every rank, whose trainer then saves and exits that code (``preemption.signals``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Iterator, Mapping, Sequence

from launch.diagnose import report_death, rss_bytes
from launch.errors import LaunchError, RanksPreempted
from lmforge_common import EXIT_PREEMPTED, PREEMPT_SIGNAL, free_port

log = logging.getLogger(__name__)

PREEMPTED_GRACE_S = 120.0
"""Seconds the other ranks get to exit after one exited ``EXIT_PREEMPTED`` (they are past the collective
save and only tearing down) before they are terminated as stuck."""

FORWARDED_SIGNALS = ("SIGTERM", f"SIG{PREEMPT_SIGNAL}")
"""Signals the launcher passes on to its ranks: what a scheduler or ``timeout`` sends to ask for a save."""


def rank_env(rank: int, nproc: int, master_addr: str, master_port: int, threads: int) -> dict[str, str]:
    """The environment variables that tell process ``rank`` of ``nproc`` where it stands."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "OMP_NUM_THREADS": str(threads)}


def run_local(command: Sequence[str], nproc: int, env: Mapping[str, str] | None = None,
              master_addr: str = "127.0.0.1", master_port: int | None = None, poll_s: float = 0.2,
              preempted_grace_s: float = PREEMPTED_GRACE_S, run_dir: str | None = None) -> None:
    """Start ``nproc`` copies of ``command`` and wait for all of them; returns when all exited 0.

    ``run_dir``: the training run dir, where the ranks' heartbeats are (for the diagnosis of a dead rank).

    Raises:
        RanksPreempted: every rank exited 0 or ``EXIT_PREEMPTED``, at least one the latter (resumable).
        LaunchError: ``nproc < 1``; a process exited with another non-zero code (the others are then
            terminated; one killed by a signal is diagnosed in one line); or, after one exited ``EXIT_PREEMPTED``, another was still running
            ``preempted_grace_s`` later (then terminated).
    """
    if nproc < 1:
        raise LaunchError(f"nproc={nproc}: need at least 1 process")
    port = master_port or free_port(master_addr)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    base = {**os.environ, **(env or {})}
    procs = [subprocess.Popen(list(command), env={**base, **rank_env(r, nproc, master_addr, port, threads)})
             for r in range(nproc)]
    rss: list[list[int]] = [[] for _ in procs]
    try:
        with _forwarding_signals(procs):
            codes = _wait(procs, poll_s, preempted_grace_s, rss)
    finally:
        _stop(procs)
    _outcome(codes, command, preempted_grace_s, rss, run_dir)


def _wait(procs: list[subprocess.Popen], poll_s: float, preempted_grace_s: float,
          rss: list[list[int]]) -> list[int | None]:
    """Exit codes (None: still running) once all exited, one failed, or the preempted grace ran out.

    Appends each running rank's RSS (bytes) to ``rss[rank]`` at every poll (the last 1000 kept).
    """
    deadline = None
    while True:
        for p, samples in zip(procs, rss):
            sample = rss_bytes(p.pid) if p.returncode is None else None
            if sample is not None:
                samples.append(sample)
                del samples[:-1000]
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0, EXIT_PREEMPTED) for c in codes):
            return codes
        if EXIT_PREEMPTED in codes:
            deadline = deadline or time.monotonic() + preempted_grace_s
            if time.monotonic() > deadline:
                return codes
        time.sleep(poll_s)


def _outcome(codes: list[int | None], command: Sequence[str], preempted_grace_s: float, rss: list[list[int]],
             run_dir: str | None) -> None:
    nproc, cmd = len(codes), " ".join(command)
    failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0, EXIT_PREEMPTED)), None)
    if failed is not None and failed[1] is not None and failed[1] < 0:  # Popen: -N = killed by signal N
        line = report_death(run_dir, failed[0], nproc, -failed[1], rss[failed[0]], node=socket.gethostname())
        raise LaunchError(f"{line.removeprefix('lmforge: ')}: {cmd}")
    if failed is not None:
        raise LaunchError(f"rank {failed[0]} of {nproc} exited with code {failed[1]}: {cmd}")
    if EXIT_PREEMPTED not in codes:
        return
    saved = codes.index(EXIT_PREEMPTED)
    stuck = [r for r, c in enumerate(codes) if c is None]
    if stuck:
        raise LaunchError(f"rank {stuck[0]} of {nproc} still ran {preempted_grace_s:g} s after rank {saved} saved and "
                          f"exited {EXIT_PREEMPTED}; terminated: {cmd}")
    raise RanksPreempted(f"{nproc} ranks saved a checkpoint and exited {EXIT_PREEMPTED} (preempted): {cmd}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the processes still running (SIGTERM, then SIGKILL after 30 s)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def _forwarding_signals(procs: list[subprocess.Popen]) -> Iterator[None]:
    """Pass :data:`FORWARDED_SIGNALS` on to the running ``procs`` (main thread only: Python's rule for handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: object) -> None:
        log.info("passing %s on to %d ranks", signal.Signals(signum).name, sum(p.poll() is None for p in procs))
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (getattr(signal, name) for name in FORWARDED_SIGNALS)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
