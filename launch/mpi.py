"""MPI launcher: ``np`` ranks of one command under OpenMPI's ``mpirun``.

mpirun starts the processes (locally, or on the hosts of a hostfile through its own daemons);
each rank finds its place in ``OMPI_COMM_WORLD_RANK`` / ``_LOCAL_RANK`` / ``_SIZE`` (read by
``pretrain.distributed``). The rendezvous is passed with ``-x``: ``MASTER_ADDR`` is the first host
of the hostfile (127.0.0.1 without one), ``MASTER_PORT`` a free local port (``master_port``
on a hostfile). No ssh launcher of our own and no MPI communication: torch.distributed (gloo or
NCCL) carries the traffic, MPI only starts the ranks. ``--bind-to none`` lets each rank's intra-op
threads use the cores it is given (OpenMPI otherwise pins each rank to one core).

Preemption (the contract of :mod:`lmforge_common`): mpirun exits with the code of the first rank
that exited non-zero and stops the others; when that code is :data:`~lmforge_common.EXIT_PREEMPTED`
the ranks had saved a checkpoint together (they exit only after the save's last barrier), so
:func:`run_mpi` raises :class:`~launch.errors.RanksPreempted`. mpirun passes SIGUSR1 on to the
ranks (OpenMPI forwards SIGUSR1 / SIGUSR2), so ``kill -USR1 <mpirun pid>`` asks for a save.

A dead rank: each rank runs under the watcher of :mod:`launch.diagnose` (``python -m launch.diagnose``),
which samples its RSS and, when it dies from a signal, prints the one-line diagnosis and dies from the
same signal (signals from mpirun reach the rank directly: its daemon signals the process group).
mpirun's default then stops the other ranks at once (an abnormal termination, or any non-zero exit,
aborts the job: no ``--mca orte_abort_on_non_zero_status 0`` here), and :func:`run_mpi` raises the
diagnosis line.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from launch.diagnose import death_lines
from launch.errors import LaunchError, RanksPreempted
from lmforge_common import EXIT_PREEMPTED, free_port

log = logging.getLogger(__name__)

FORWARDED_VARS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES",
                  "OMP_NUM_THREADS")
"""Variables passed to every rank (``mpirun -x``) when set here; remote ranks get no other environment."""

FORWARDED_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "HF_")
"""Every variable with one of these prefixes is forwarded too."""

DEFAULT_MASTER_PORT = 29500
"""Rendezvous port with a hostfile (torch.distributed's default); the free port of this host can't be checked there."""


def read_hostfile(path: str | Path) -> list[str]:
    """Hosts of an OpenMPI hostfile (``host [slots=N] ...`` per line, ``#`` comments), in order.

    Raises:
        LaunchError: the file is missing or names no host.
    """
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"{path}: hostfile not found")
    hosts = [line.split("#")[0].split()[0] for line in path.read_text().splitlines() if line.split("#")[0].strip()]
    if not hosts:
        raise LaunchError(f"{path}: hostfile names no host")
    return hosts


def mpirun_command(command: Sequence[str], np: int, mpirun: str = "mpirun", hostfile: str | None = None,
                   master_addr: str | None = None, master_port: int | None = None,
                   env: dict[str, str] | None = None, cpu_count: int | None = None,
                   run_dir: str | None = None) -> list[str]:
    """The ``mpirun`` argument list that starts ``np`` ranks of ``command``.

    Args:
        master_addr: default: the hostfile's first host, else 127.0.0.1.
        master_port: default: ``DEFAULT_MASTER_PORT`` with a hostfile, else a free local port.
        env: the environment to forward from (default ``os.environ``).
        cpu_count: cores of this machine (default ``os.cpu_count()``); without a hostfile more
            ranks than cores add ``--oversubscribe`` and ``OMP_NUM_THREADS`` is cores // np.
        run_dir: the training run dir (heartbeats; where the watcher writes a dead rank's details).

    Raises:
        LaunchError: ``np < 1`` or an unreadable hostfile.
    """
    if np < 1:
        raise LaunchError(f"--np {np}: need at least 1 rank")
    env = dict(os.environ if env is None else env)
    cmd = [mpirun, "-np", str(np), "--bind-to", "none"]
    if hostfile:
        hosts = read_hostfile(hostfile)
        cmd += ["--hostfile", str(hostfile)]
        master_addr = master_addr or hosts[0]
        master_port = master_port or DEFAULT_MASTER_PORT
    else:
        cores = cpu_count or os.cpu_count() or 1
        if np > cores:
            cmd.append("--oversubscribe")
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // np)))
        master_addr = master_addr or "127.0.0.1"
        master_port = master_port or free_port(master_addr)
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")  # OpenMPI refuses root without it (containers, CI)
    cmd += ["-x", f"MASTER_ADDR={master_addr}", "-x", f"MASTER_PORT={master_port}"]
    for key in sorted(env):
        if key in FORWARDED_VARS or key.startswith(FORWARDED_PREFIXES):
            cmd += ["-x", f"{key}={env[key]}"]
    watcher = [sys.executable, "-m", "launch.diagnose", *(["--run-dir", run_dir] if run_dir else []), "--"]
    return cmd + watcher + list(command)


def find_openmpi() -> str:
    """Path of an OpenMPI ``mpirun``.

    Raises:
        LaunchError: no mpirun on PATH, or it is not OpenMPI's (MPICH / Intel MPI take other options:
            run their mpiexec yourself; ranks then come from ``PMI_RANK`` / ``PMI_SIZE``).
    """
    exe = shutil.which("mpirun")
    if exe is None:
        raise LaunchError("mpirun not found on PATH: install OpenMPI (e.g. apt install openmpi-bin)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    if "Open MPI" not in version.stdout + version.stderr:
        raise LaunchError(f"{exe} is not OpenMPI's mpirun: start the ranks with its own mpiexec "
                          "(lmforge train reads PMI_RANK / PMI_SIZE, and MASTER_ADDR / MASTER_PORT)")
    return exe


def run_mpi(command: Sequence[str], np: int, hostfile: str | None = None, master_addr: str | None = None,
            master_port: int | None = None, run_dir: str | None = None) -> None:
    """Run ``np`` ranks of ``command`` under mpirun and wait; mpirun stops all ranks when one fails.

    Raises:
        RanksPreempted: mpirun exited ``EXIT_PREEMPTED``: the ranks saved a checkpoint (resumable).
        LaunchError: see :func:`find_openmpi` and :func:`mpirun_command`; mpirun exited with another non-zero code
            (a rank killed by a signal: its one-line diagnosis, see :mod:`launch.diagnose`).
    """
    cmd = mpirun_command(command, np, find_openmpi(), hostfile, master_addr, master_port, run_dir=run_dir)
    log.info("starting %d ranks: %s", np, " ".join(cmd))
    started = time.time()
    rc = subprocess.run(cmd).returncode
    if rc == EXIT_PREEMPTED:
        raise RanksPreempted(f"{np} MPI ranks saved a checkpoint and exited {EXIT_PREEMPTED} (preempted): "
                             f"{' '.join(command)}")
    deaths = death_lines(run_dir, started) if rc != 0 else []
    if deaths:
        raise LaunchError(f"{deaths[0].removeprefix('lmforge: ')}: {' '.join(command)}")
    if rc != 0:
        raise LaunchError(f"mpirun exited with code {rc} ({np} ranks of: {' '.join(command)}); the failing rank's "
                          "output is above")
