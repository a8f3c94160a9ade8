"""A rank killed by a signal is diagnosed in one line by every launcher (launch.diagnose), and its peers are stopped."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch.diagnose import death_path
from launch.errors import LaunchError
from launch.local import run_local
from launch.mpi import run_mpi
from tests.launch.conftest import require, which


def _rank(run_dir, victim: int, signum: int, rank_var: str = "RANK") -> str:
    """A fake rank: writes a heartbeat at step 7, holds ~64 MiB; rank ``victim`` then dies from ``signum``, the others wait."""
    return ("import os, signal, socket, time; from lmforge_common import heartbeat_path, write_json_atomic; "
            f"r = int(os.environ[{rank_var!r}]); heartbeat_path(r'{run_dir}', r).parent.mkdir(exist_ok=True); "
            f"write_json_atomic(heartbeat_path(r'{run_dir}', r), dict(rank=r, host=socket.gethostname(), pid=os.getpid(), "
            "step=7, time_unix_s=time.time())); "
            "ballast = bytearray(64 << 20); time.sleep(1.5); "
            f"os.kill(os.getpid(), {int(signum)}) if r == {victim} else time.sleep(60)")


def test_local_sigkill_names_signal_rank_node_step_and_the_oom_killer(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchError) as err:
        run_local([sys.executable, "-c", _rank(tmp_path, 1, signal.SIGKILL)], nproc=2, run_dir=str(tmp_path))
    assert time.monotonic() - start < 30  # rank 0 was stopped, not waited for
    line = str(err.value)
    assert "\n" not in line
    assert f"rank 1 of 2 on node {os.uname().nodename} was killed by SIGKILL after completing step 7" in line, line
    assert "likely the out-of-memory killer: its last sampled RSS was" in line and "GiB available of" in line, line
    details = json.loads(death_path(tmp_path, 1).read_text())
    assert details["heartbeat"]["step"] == 7 and details["signal"] == signal.SIGKILL
    assert details["last_rss_bytes"] > 64 << 20  # the ballast was resident when sampled
    assert details["node_memory_bytes"]["MemTotal"] > 0


def test_local_sigsegv_without_heartbeat_has_no_oom_hint(tmp_path):
    code = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV) if os.environ['RANK'] == '0' else __import__('time').sleep(60)"
    with pytest.raises(LaunchError, match="rank 0 of 2 on node .* was killed by SIGSEGV before completing any step") as err:
        run_local([sys.executable, "-c", code], nproc=2, run_dir=str(tmp_path))
    assert "out-of-memory" not in str(err.value)


def test_watcher_reports_sigterm_in_the_rank_log_and_dies_the_same_way(tmp_path):
    """The srun / mpirun side: the watcher prints the line and ends with the rank's own signal."""
    env = {**os.environ, "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}
    proc = subprocess.run([sys.executable, "-m", "launch.diagnose", "--run-dir", str(tmp_path), "--", sys.executable, "-c",
                           _rank(tmp_path, 3, signal.SIGTERM, "SLURM_PROCID")], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGTERM and not proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert "lmforge: rank 3 of 4 on node" in lines[0] and "killed by SIGTERM after completing step 7" in lines[0]
    assert "out-of-memory" not in lines[0] and str(death_path(tmp_path, 3)) in lines[1]


def test_mpirun_stops_the_others_and_raises_the_line(tmp_path):
    require(None if which("mpirun") else "OpenMPI's mpirun is not installed (make system-deps installs openmpi-bin)")
    start = time.monotonic()
    with pytest.raises(LaunchError) as err:
        run_mpi([sys.executable, "-c", _rank(tmp_path, 1, signal.SIGKILL, "OMPI_COMM_WORLD_RANK")], 2, run_dir=str(tmp_path))
    assert time.monotonic() - start < 30  # mpirun's default ended rank 0 when rank 1 died
    line = str(err.value)
    assert "rank 1 of 2 on node" in line and "killed by SIGKILL after completing step 7" in line, line
    assert "likely the out-of-memory killer: its last sampled RSS was" in line, line


def test_usr1_to_mpirun_still_reaches_the_ranks_through_the_watcher(tmp_path):
    """mpirun forwards SIGUSR1 to the processes it started (the watchers), which pass it on: the save request works."""
    require(None if which("mpirun") else "OpenMPI's mpirun is not installed (make system-deps installs openmpi-bin)")
    from lmforge_common import EXIT_PREEMPTED

    rank = ("import os, pathlib, signal, sys, time; "
            f"signal.signal(signal.SIGUSR1, lambda *a: sys.exit({EXIT_PREEMPTED})); "
            f"pathlib.Path(r'{tmp_path}', 'ready' + os.environ['OMPI_COMM_WORLD_RANK']).touch(); time.sleep(60)")
    launcher = ("import sys; from launch.errors import RanksPreempted; from launch.mpi import run_mpi\n"
                f"try: run_mpi([sys.executable, '-c', {rank!r}], 2, run_dir={str(tmp_path)!r})\n"
                f"except RanksPreempted: sys.exit({EXIT_PREEMPTED})")
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    mpirun = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert mpirun, "mpirun not found under the launcher"
    os.kill(int(mpirun[0]), signal.SIGUSR1)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED
    assert not list((tmp_path / "launch").glob("*")) if (tmp_path / "launch").exists() else True  # no death reported
