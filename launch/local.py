"""Local launcher: ``nproc`` processes of one command on this machine, torchrun-style environment.

Each process gets ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` /
``MASTER_ADDR`` / ``MASTER_PORT`` and ``OMP_NUM_THREADS = cores // nproc`` (so ranks do not
oversubscribe the CPU). When one process fails the others are terminated: a dead rank would
otherwise leave its peers blocked in a collective forever.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Mapping, Sequence

from launch.errors import LaunchError
from lmforge_common import free_port

log = logging.getLogger(__name__)


def rank_env(rank: int, nproc: int, master_addr: str, master_port: int, threads: int) -> dict[str, str]:
    """The environment variables that tell process ``rank`` of ``nproc`` where it stands."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "OMP_NUM_THREADS": str(threads)}


def run_local(command: Sequence[str], nproc: int, env: Mapping[str, str] | None = None,
              master_addr: str = "127.0.0.1", master_port: int | None = None, poll_s: float = 0.2) -> None:
    """Start ``nproc`` copies of ``command`` and wait for all of them.

    Raises:
        LaunchError: ``nproc < 1``, or a process exited non-zero (the others are then terminated).
    """
    if nproc < 1:
        raise LaunchError(f"nproc={nproc}: need at least 1 process")
    port = master_port or free_port(master_addr)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    base = {**os.environ, **(env or {})}
    procs = [subprocess.Popen(list(command), env={**base, **rank_env(r, nproc, master_addr, port, threads)})
             for r in range(nproc)]
    failed: tuple[int, int] | None = None
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    failed = (rank, p.returncode)
                    break
            if failed:
                break
            time.sleep(poll_s)
        if failed is None:
            failed = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0), None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if failed is not None:
        raise LaunchError(f"rank {failed[0]} of {nproc} exited with code {failed[1]}: {' '.join(command)}")
