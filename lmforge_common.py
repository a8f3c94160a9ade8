"""What data_prep, pretrain and launch share; imports nothing of lmforge's, so any package may import it.

Three contracts live here, each defined once:

- **User errors.** :class:`UserError` is the base of every error a user can fix (bad input, bad
  configuration, a failed launch). The CLI prints one as a single line and exits non-zero, without a
  traceback; each package derives its own kinds from it (``data_prep.errors``, ``pretrain.errors``,
  ``launch.errors``).
- **Atomic writes.** :func:`write_bytes_atomic` and :func:`write_json_atomic` write to ``NAME.tmp``
  and rename over ``NAME`` (``os.replace`` is atomic on POSIX), so a reader sees the old file or the
  whole new one, never half of it. Manifests, checkpoint state and markers are written this way.
- **The launcher <-> rank exit-code contract.** A rank that caught the preemption signal (or ran out
  of its time budget) and saved a checkpoint together with every other rank exits
  :data:`EXIT_PREEMPTED`, and only after the save's last barrier, so when any rank has exited with
  it the checkpoint is complete. Every launcher (local, MPI, the Slurm batch script) passes that
  code on as "saved, resumable": the Slurm script requeues the job; ``launch.local.run_local`` and
  ``launch.mpi.run_mpi`` raise ``launch.errors.RanksPreempted``, on which ``lmforge launch
  local|mpi`` print one line naming the step and the checkpoint and exit with the code. The step and
  checkpoint are not part of what a rank reports: the CLI (which may import ``pretrain``) reads the
  run dir's newest complete checkpoint, so ``launch`` needs no knowledge of the checkpoint layout
  and ranks print nothing machine-readable. The rendezvous port of a Slurm job (:func:`rendezvous_port`) is
  part of the same contract: the batch script computes it in bash, an srun task in Python.

Why a top-level module: ``launch`` may import neither ``data_prep`` nor ``pretrain``, and
``data_prep`` may not import ``pretrain``; a module inside any one of them could not be shared by
all three without a door going the wrong way (docs/architecture.md).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

VERSION = "0.1.0"
"""lmforge's version: setup.py reads it from here, and prep writes it into each manifest (without the
tens of milliseconds ``importlib.metadata`` costs to import, a share of prep's fixed cost)."""

EXIT_PREEMPTED = 75
"""Exit code of a rank (and of ``lmforge launch local|mpi``) that saved a checkpoint on preemption or at
its time budget and can be resumed by rerunning the same command: ``EX_TEMPFAIL`` of BSD
``sysexits.h`` ("temporary failure, the user is invited to retry")."""

PREEMPT_SIGNAL = "USR1"
"""Signal name (as ``sbatch --signal`` and ``scancel --signal`` spell it) that asks ranks to save and exit."""

RENDEZVOUS_PORT_BASE = 12000
"""Lowest rendezvous port (TCP) of a Slurm job; below the Linux ephemeral range (32768-60999), so the
kernel does not hand it out as a client port."""

RENDEZVOUS_PORT_SPAN = 20000
"""Number of distinct rendezvous ports; ports are ``RENDEZVOUS_PORT_BASE`` .. ``+ SPAN - 1`` (12000-31999)."""

ENV_SCHEMES = (
    ("torchrun", "RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("OpenMPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("MPICH", "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ("Slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS"),
)
"""``(launcher, rank, local rank, world size)`` variables, in order of precedence. Slurm's world size
is the step's task count: the batch script itself has ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N`` too,
and a training started there without srun must not wait for N-1 peers that never come. Here rather than
in ``pretrain.distributed`` (which reads them): the CLI reads the rank from them first thing
(``lmforge.cli.env_rank``), and ``lmforge prep`` should not import the training package for that."""

TMP_SUFFIX = ".tmp"
"""Suffix of a file or folder being written; renamed away when complete, never read as complete."""


class UserError(Exception):
    """Bad input, configuration or launch a user can fix. The message is one line naming the file, field and numbers."""

    agreed_by_all_ranks = False
    """True where every rank raises the same message after a collective agreement: only rank 0 prints it."""


def rendezvous_port(job_id: int) -> int:
    """``MASTER_PORT`` (TCP port) of Slurm job ``job_id``: the same on every rank without communication,
    different for jobs sharing a head node unless their ids are ``RENDEZVOUS_PORT_SPAN`` apart."""
    return RENDEZVOUS_PORT_BASE + int(job_id) % RENDEZVOUS_PORT_SPAN


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path + TMP_SUFFIX``, flush it to disk, and rename it over ``path``.

    Raises:
        OSError: the write or the rename failed; ``path`` is then untouched (the temp file may remain).
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented UTF-8 JSON (trailing newline) to ``path`` with :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


HEARTBEAT_DIR = "heartbeat"
"""Run-dir folder of the ranks' heartbeats: ``heartbeat/rank{r}.json`` = ``{"rank", "host", "pid", "step",
"time_unix_s"}``, rewritten atomically by each rank after every optimizer step (``step`` = optimizer steps
completed). Launchers read it (without importing pretrain) to say which step a dead or hung rank last finished."""


def heartbeat_path(run_dir: str | Path, rank: int) -> Path:
    """Where rank ``rank`` of the run in ``run_dir`` writes its heartbeat."""
    return Path(run_dir) / HEARTBEAT_DIR / f"rank{rank}.json"


def read_heartbeat(run_dir: str | Path, rank: int) -> dict | None:
    """Rank ``rank``'s last heartbeat, or None when it wrote none (or it cannot be read)."""
    try:
        return json.loads(heartbeat_path(run_dir, rank).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
