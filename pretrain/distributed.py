"""Distributed set-up in one place: :func:`init_distributed` and the rank-0 logger.

Rank, local rank and world size come from the launcher's environment: ``RANK`` / ``LOCAL_RANK`` /
``WORLD_SIZE`` (torchrun, ``lmforge launch``), else Slurm (``SLURM_PROCID`` ...), else OpenMPI
(``OMPI_COMM_WORLD_RANK`` ...); with none of them the process is a world of one. The backend is
nccl when CUDA is available and gloo otherwise: one code path for CPU and GPU.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

log = logging.getLogger("lmforge")

_ENV_SCHEMES = (
    ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
)


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


def dist_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the first launcher scheme found in the environment."""
    for rank_key, local_key, world_key in _ENV_SCHEMES:
        if rank_key in os.environ and world_key in os.environ:
            rank = int(os.environ[rank_key])
            return rank, int(os.environ.get(local_key, rank)), int(os.environ[world_key])
    return 0, 0, 1


def select_accelerator() -> str:
    """Tell DeepSpeed which accelerator to use before it is imported: ``cuda`` if present, else ``cpu``."""
    import torch

    name = os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    return name


def init_distributed() -> DistInfo:
    """Initialise ``torch.distributed`` through DeepSpeed (gloo on CPU, nccl on GPU); idempotent.

    A single process with no launcher environment gets ``MASTER_ADDR=127.0.0.1`` and a free port.
    """
    import torch

    rank, local_rank, world_size = dist_env()
    accelerator = select_accelerator()
    backend = "nccl" if accelerator == "cuda" else "gloo"
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size)})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    import deepspeed

    # DeepSpeed's ZeRO calls a torch collective that torch has deprecated; not actionable here.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines drown the rank-0 progress bar
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, backend=backend)


def destroy_distributed() -> None:
    """Tear down the process group if one is up (call in ``finally``)."""
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
