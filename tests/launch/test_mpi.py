"""``lmforge launch mpi`` under real OpenMPI, and rank discovery through mpi4py under a plain mpirun."""
import importlib.util
import os
import subprocess
import sys

import pytest

from launch.errors import LaunchError, RanksPreempted
from launch.mpi import DEFAULT_MASTER_PORT, mpirun_command, run_mpi
from lmforge_common import EXIT_PREEMPTED
from tests.launch.conftest import require, which


def test_mpirun_command_on_a_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8  # second\n")
    cmd = mpirun_command(["python", "-m", "lmforge", "train", "c.yaml"], 16, hostfile=str(hostfile),
                         env={"PYTHONPATH": "/src", "NCCL_DEBUG": "INFO", "HOME": "/root"})
    assert cmd[:5] == ["mpirun", "-np", "16", "--bind-to", "none"] and cmd[-5:] == ["python", "-m", "lmforge", "train", "c.yaml"]
    assert ["--hostfile", str(hostfile)] == cmd[5:7] and "--oversubscribe" not in cmd
    forwarded = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-x"]
    assert forwarded == ["MASTER_ADDR=node-a", f"MASTER_PORT={DEFAULT_MASTER_PORT}", "NCCL_DEBUG=INFO", "PYTHONPATH=/src"]


def test_mpirun_command_locally_splits_the_cores():
    cmd = mpirun_command(["true"], 4, env={}, cpu_count=2, master_port=1234)
    assert "--oversubscribe" in cmd
    assert {"MASTER_ADDR=127.0.0.1", "MASTER_PORT=1234", "OMP_NUM_THREADS=1"} <= set(cmd)


def test_bad_rank_count_and_hostfile(tmp_path):
    with pytest.raises(LaunchError, match="--np 0: need at least 1 rank"):
        mpirun_command(["true"], 0)
    with pytest.raises(LaunchError, match="hosts: hostfile not found"):
        mpirun_command(["true"], 2, hostfile=str(tmp_path / "hosts"))
    (tmp_path / "empty").write_text("# nobody\n")
    with pytest.raises(LaunchError, match="empty: hostfile names no host"):
        mpirun_command(["true"], 2, hostfile=str(tmp_path / "empty"))


def _require_mpirun():
    require(None if which("mpirun") else "OpenMPI's mpirun is not installed (make system-deps installs openmpi-bin)")


def test_ranks_exiting_75_under_mpirun_raise_ranks_preempted():
    _require_mpirun()
    code = f"import os, sys, time; time.sleep(int(os.environ['OMPI_COMM_WORLD_RANK'])); sys.exit({EXIT_PREEMPTED})"
    with pytest.raises(RanksPreempted, match=f"2 MPI ranks saved a checkpoint and exited {EXIT_PREEMPTED}"):
        run_mpi([sys.executable, "-c", code], 2)
    with pytest.raises(LaunchError, match="mpirun exited with code 3") as failed:
        run_mpi([sys.executable, "-c", "import sys; sys.exit(3)"], 2)
    assert not isinstance(failed.value, RanksPreempted)


def test_two_rank_training_under_mpirun_preempted_then_resumed(tiny_config, tmp_path):
    _require_mpirun()
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "lmforge", "launch", "mpi", "--np", "2", str(tiny_config), f"run_dir={run_dir}"]
    proc = subprocess.run([*command, "preemption.max_minutes=0.0001"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == (  # the budget runs out after the first step
        f"lmforge: preempted at step 1 of 5, checkpoint {run_dir / 'checkpoints' / 'step_00000001'} saved "
        f"(exit code {EXIT_PREEMPTED}); rerun the same command to resume"), proc.stdout
    assert "lmforge: error" not in proc.stderr, proc.stderr[-3000:]
    # the resume with --force under a memory plan that cannot fit (1 MiB): a warning, and the ranks start anyway
    # (the refusal without --force: tests/pretrain/test_plan.py::test_launch_mpi_refuses_before_starting_ranks)
    tight = {**os.environ, "LMFORGE_AVAILABLE_MEMORY_BYTES": str(2**20)}
    proc = subprocess.run([*command[:5], "--force", *command[5:]], cwd=tmp_path, capture_output=True, text=True, env=tight)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lmforge: warning (--force): memory plan: llama-test" in proc.stderr
    assert "trained on 2 MPI ranks" in proc.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    rank_rows = [(run_dir / "data-indices" / f"rank{r}.tsv").read_text().splitlines() for r in range(2)]
    assert len(rank_rows[0]) == len(rank_rows[1]) == 5 and rank_rows[0] != rank_rows[1]


def test_plain_mpirun_ranks_rendezvous_through_mpi4py(tmp_path):
    """No MASTER_ADDR from the launcher: DeepSpeed's MPI discovery (mpi4py) supplies it, then gloo all-reduces.

    Each rank writes its line to a file: mpirun's stdout forwarding of a process that exits right
    after printing was seen to drop the output once under heavy load."""
    _require_mpirun()
    require(None if importlib.util.find_spec("mpi4py") else "mpi4py is not installed (pip install -e '.[test]')")
    code = ("import os, pathlib; from pretrain.distributed import init_distributed, all_reduce_sum, destroy_distributed; "
            "d = init_distributed(); row = f\"rank {d.rank} {d.world_size} {all_reduce_sum([d.rank + 1.0])[0]} "
            "{os.environ['MASTER_ADDR'] != ''}\"; "
            f"pathlib.Path(r'{tmp_path}', f'rank{{d.rank}}.txt').write_text(row); destroy_distributed()")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    proc = subprocess.run(["mpirun", "-np", "2", "--bind-to", "none", *root, sys.executable, "-c", code],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert rows == ["rank 0 2 3.0 True", "rank 1 2 3.0 True"], proc.stdout + proc.stderr
