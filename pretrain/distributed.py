"""Distributed set-up in one place: rank discovery, rendezvous, :func:`init_distributed`, the rank-0 logger.

Rank, local rank and world size come from the launcher's environment, the first complete scheme
of :data:`ENV_SCHEMES` winning: ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (torchrun, DeepSpeed,
``lmforge launch local|mpi``), OpenMPI (``OMPI_COMM_WORLD_*``), MPICH / Intel MPI (``PMI_RANK`` /
``PMI_SIZE``), an srun task (``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_STEP_NUM_TASKS``);
with none of them the process is a world of one. MPI comes before Slurm because ``mpirun`` inside
an allocation starts its daemons with srun, so the Slurm variables then describe the daemons.

The rendezvous (``MASTER_ADDR`` / ``MASTER_PORT``) is the launcher's; when it set none, an srun
task derives it as ``lmforge launch slurm``'s batch script does (:func:`slurm_rendezvous`), an MPI
rank lets DeepSpeed discover it through mpi4py, and a world of one uses 127.0.0.1 and a free port.
The backend is nccl when CUDA is available and gloo otherwise: one code path for CPU and GPU.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass

from lmforge_common import ENV_SCHEMES, free_port, rendezvous_port
from pretrain.errors import DistributedError

log = logging.getLogger("lmforge")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    """Global data-parallel rank, 0 .. world_size - 1."""
    local_rank: int
    """Rank on this node; selects the GPU."""
    world_size: int
    """Number of processes (data-parallel ranks)."""
    backend: str
    """torch.distributed backend: nccl or gloo."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover_ranks() -> tuple[str, int, int, int]:
    """``(launcher, rank, local_rank, world_size)`` from the first scheme of :data:`ENV_SCHEMES` found.

    ``launcher`` is ``"none"`` (rank 0 of 1) when no scheme is set.

    Raises:
        DistributedError: a world size above 1 is set but its rank variable is not, or a value is not an
            integer, or the rank is outside ``0 .. world_size - 1``.
    """
    env = os.environ
    for launcher, rank_key, local_key, world_key in ENV_SCHEMES:
        if world_key not in env:
            continue
        world_size = _int_var(world_key)
        if rank_key not in env:
            if world_size > 1:
                raise DistributedError(f"{world_key}={world_size} asks for {world_size} ranks but {rank_key} is not set: start the "
                                  "ranks with a launcher (lmforge launch local|slurm|mpi, torchrun, srun, mpirun)")
            continue
        rank = _int_var(rank_key)
        local_rank = _int_var(local_key) if local_key in env else rank
        if not 0 <= rank < world_size:
            raise DistributedError(f"{rank_key}={rank} is outside 0 .. {world_size - 1} ({world_key}={world_size})")
        return launcher, rank, local_rank, world_size
    return "none", 0, 0, 1


def _int_var(key: str) -> int:
    try:
        return int(os.environ[key])
    except ValueError:
        raise DistributedError(f"environment variable {key}={os.environ[key]!r} is not an integer") from None


def dist_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` of this process; see :func:`discover_ranks` (same errors)."""
    return discover_ranks()[1:]


def slurm_rendezvous(nodelist: str, job_id: int) -> tuple[str, int]:
    """``(MASTER_ADDR, MASTER_PORT)`` of Slurm job ``job_id``, the rule of ``lmforge launch slurm``'s script.

    The address is the ``NodeAddr`` (what Slurm itself uses to reach the node; it defaults to the
    node name) of the first host of ``nodelist`` (``SLURM_JOB_NODELIST``, expanded by ``scontrol
    show hostnames``); the port is :func:`lmforge_common.rendezvous_port` of the job id.

    Raises:
        DistributedError: ``scontrol`` is not on PATH or fails.
    """
    head = _scontrol("show", "hostnames", nodelist).split()[0]
    match = re.search(r"(?:^|\s)NodeAddr=(\S+)", _scontrol("show", "node", head, "-o"))
    return (match.group(1) if match else head), rendezvous_port(job_id)


def _scontrol(*args: str) -> str:
    exe = shutil.which("scontrol")
    if exe is None:
        raise DistributedError("an srun task without MASTER_ADDR/MASTER_PORT needs scontrol on PATH to find the head node; "
                          "export MASTER_ADDR and MASTER_PORT or start the job with lmforge launch slurm")
    proc = subprocess.run([exe, *args], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise DistributedError(f"scontrol {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _set_rendezvous(launcher: str, world_size: int) -> bool:
    """Fill ``MASTER_ADDR`` / ``MASTER_PORT`` when the launcher did not; False = leave it to DeepSpeed's MPI discovery."""
    env = os.environ
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return True
    if world_size == 1:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(free_port(env["MASTER_ADDR"]))
        return True
    if launcher == "Slurm":
        addr, port = slurm_rendezvous(env["SLURM_JOB_NODELIST"], int(env["SLURM_JOB_ID"]))
        env.setdefault("MASTER_ADDR", addr)
        env.setdefault("MASTER_PORT", str(port))
        return True
    if launcher in ("OpenMPI", "MPICH"):
        import importlib.util

        if importlib.util.find_spec("mpi4py") is not None:
            return False
        raise DistributedError(f"{world_size} MPI ranks but MASTER_ADDR/MASTER_PORT are not set and mpi4py is not installed: "
                          "start with lmforge launch mpi, pass them with mpirun -x, or pip install mpi4py")
    raise DistributedError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: the launcher must export both")


def select_accelerator() -> str:
    """Tell DeepSpeed which accelerator to use before it is imported: ``cuda`` if present, else ``cpu``."""
    import torch

    name = os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    return name


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise ``torch.distributed`` through DeepSpeed (gloo on CPU, nccl on GPU); idempotent.

    ``timeout_minutes`` (``distributed.timeout_minutes``): how long any collective waits for the other ranks
    before it raises (gloo honours it on every collective; NCCL's watchdog aborts the communicator).

    Sets ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` and the rendezvous in ``os.environ`` (see the
    module docstring for where they come from).

    Raises:
        DistributedError: see :func:`discover_ranks`; a world size above 1 with no rendezvous that
            can be derived.
    """
    import torch

    launcher, rank, local_rank, world_size = discover_ranks()
    if launcher == "none" and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        log.warning("SLURM_NTASKS=%s but this process is not an srun task: training as a world of one "
                    "(start the ranks with srun or lmforge launch slurm)", os.environ["SLURM_NTASKS"])
    accelerator = select_accelerator()
    backend = "nccl" if accelerator == "cuda" else "gloo"
    if _set_rendezvous(launcher, world_size):
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size)})
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    import deepspeed

    # DeepSpeed's ZeRO calls a torch collective that torch has deprecated; not actionable here.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, auto_mpi_discovery=True,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines drown the rank-0 progress bar
    log.debug("rank %d of %d (local rank %d) from the %s environment, rendezvous %s:%s", rank, world_size, local_rank,
              launcher, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, backend=backend)


def set_collective_timeout(timeout_minutes: float) -> None:
    """Give DeepSpeed's data-parallel process group the timeout of the world group (``distributed.timeout_minutes``).

    DeepSpeed makes its own group for ZeRO's gradient reductions and parameter gathers (``dist.new_group``
    without a timeout: torch's default, 30 minutes for gloo, 10 for NCCL), so the world group's timeout alone
    would not end a hang inside a step. torch offers no public setter; ``_set_pg_timeout`` is its own helper
    for this. Call after the engine is built; no-op without a process group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from deepspeed.utils import groups
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(minutes=timeout_minutes), groups._get_data_parallel_group())


def destroy_distributed() -> None:
    """Tear down the process group if one is up (call in ``finally``).

    The world group's gloo threads can outlive this call; a ``train`` process therefore ends without the
    interpreter's finalization (:func:`lmforge.cli.entry` says why).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def log_rank0(msg: str, *args) -> None:
    """Log ``msg % args`` at INFO on rank 0 only: the one logging path of the trainer."""
    if dist_env()[0] == 0:
        log.info(msg, *args)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats across ranks (float64 on the engine's device); identity with no process group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
