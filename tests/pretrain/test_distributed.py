"""Rank discovery from each launcher's environment, its precedence, and the errors when it is incomplete."""
import pytest

from pretrain.distributed import ENV_SCHEMES, discover_ranks
from pretrain.errors import DistributedError

ALL_VARS = sorted({v for scheme in ENV_SCHEMES for v in scheme[1:]} | {"SLURM_NTASKS"})


@pytest.fixture
def env(monkeypatch):
    for key in ALL_VARS:
        monkeypatch.delenv(key, raising=False)

    def set_env(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, str(value))
    return set_env


@pytest.mark.parametrize("values, expected", [
    ({}, ("none", 0, 0, 1)),
    ({"RANK": 3, "LOCAL_RANK": 1, "WORLD_SIZE": 4}, ("torchrun", 3, 1, 4)),
    ({"OMPI_COMM_WORLD_RANK": 5, "OMPI_COMM_WORLD_LOCAL_RANK": 1, "OMPI_COMM_WORLD_SIZE": 8}, ("OpenMPI", 5, 1, 8)),
    ({"PMI_RANK": 2, "PMI_SIZE": 4}, ("MPICH", 2, 2, 4)),
    ({"PMI_RANK": 2, "MPI_LOCALRANKID": 0, "PMI_SIZE": 4}, ("MPICH", 2, 0, 4)),
    ({"SLURM_PROCID": 7, "SLURM_LOCALID": 3, "SLURM_STEP_NUM_TASKS": 8, "SLURM_NTASKS": 8}, ("Slurm", 7, 3, 8)),
    # the batch script itself (no srun step): SLURM_PROCID=0 and SLURM_NTASKS=2, but no step -> a world of one
    ({"SLURM_PROCID": 0, "SLURM_LOCALID": 0, "SLURM_NTASKS": 2}, ("none", 0, 0, 1)),
    # mpirun inside an allocation: its daemons were started by srun; the MPI variables describe the ranks
    ({"OMPI_COMM_WORLD_RANK": 3, "OMPI_COMM_WORLD_SIZE": 4, "SLURM_PROCID": 1, "SLURM_STEP_NUM_TASKS": 2},
     ("OpenMPI", 3, 3, 4)),
    ({"WORLD_SIZE": 1}, ("none", 0, 0, 1)),
])
def test_each_launcher_scheme(env, values, expected):
    env(**values)
    assert discover_ranks() == expected


@pytest.mark.parametrize("values, message", [
    ({"WORLD_SIZE": 2}, "WORLD_SIZE=2 asks for 2 ranks but RANK is not set: start the ranks with a launcher"),
    ({"PMI_SIZE": 4}, "PMI_SIZE=4 asks for 4 ranks but PMI_RANK is not set"),
    ({"RANK": 2, "WORLD_SIZE": 2}, r"RANK=2 is outside 0 \.\. 1 \(WORLD_SIZE=2\)"),
    ({"RANK": "zero", "WORLD_SIZE": 2}, "environment variable RANK='zero' is not an integer"),
])
def test_incomplete_or_bad_environment_is_one_clear_line(env, values, message):
    env(**values)
    with pytest.raises(DistributedError, match=message) as exc:
        discover_ranks()
    assert "\n" not in str(exc.value)


def test_many_ranks_without_a_rendezvous_is_refused(env, monkeypatch):
    from pretrain.distributed import init_distributed

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=2)
    with pytest.raises(DistributedError, match="WORLD_SIZE=2 but MASTER_ADDR/MASTER_PORT are not set"):
        init_distributed()
