import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.errors import LaunchError, RanksPreempted
from launch.local import run_local
from lmforge_common import EXIT_PREEMPTED


def test_each_rank_gets_its_environment(tmp_path):
    code = ("import os, pathlib; e = os.environ; "
            f"pathlib.Path(r'{tmp_path}', 'rank' + e['RANK']).write_text(' '.join(e[k] for k in "
            "('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')))")
    run_local([sys.executable, "-c", code], nproc=3)
    rows = [(tmp_path / f"rank{r}").read_text().split() for r in range(3)]
    assert [r[:3] for r in rows] == [[str(r), str(r), "3"] for r in range(3)]
    assert len({r[4] for r in rows}) == 1 and rows[0][3] == "127.0.0.1"


def test_a_failing_rank_stops_the_others_and_is_named():
    code = "import os, sys, time; r = int(os.environ['RANK']); time.sleep(0 if r == 1 else 60); sys.exit(3 if r == 1 else 0)"
    start = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 of 2 exited with code 3"):
        run_local([sys.executable, "-c", code], nproc=2)
    assert time.monotonic() - start < 30


def test_preempted_ranks_are_left_to_finish_then_reported(tmp_path):
    """Rank 0 exits 75 at once; rank 1 is still tearing down for a second and must not be terminated."""
    code = ("import os, pathlib, sys, time; r = os.environ['RANK']; time.sleep(int(r)); "
            f"pathlib.Path(r'{tmp_path}', 'done' + r).touch(); sys.exit({EXIT_PREEMPTED})")
    with pytest.raises(RanksPreempted, match=f"2 ranks saved a checkpoint and exited {EXIT_PREEMPTED}"):
        run_local([sys.executable, "-c", code], nproc=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done0", "done1"]


def test_a_rank_still_running_after_the_others_were_preempted_is_named(tmp_path):
    code = f"import os, sys, time; r = int(os.environ['RANK']); time.sleep(60 * r); sys.exit({EXIT_PREEMPTED})"
    start = time.monotonic()
    with pytest.raises(LaunchError, match=f"rank 1 of 2 still ran 1 s after rank 0 saved and exited {EXIT_PREEMPTED}"):
        run_local([sys.executable, "-c", code], nproc=2, preempted_grace_s=1)
    assert time.monotonic() - start < 30


def test_usr1_to_the_launcher_reaches_every_rank(tmp_path):
    """A scheduler signals the launcher only; each rank must get the signal to save (here: exit 75)."""
    rank = ("import os, pathlib, signal, sys, time; "
            f"signal.signal(signal.SIGUSR1, lambda *a: sys.exit({EXIT_PREEMPTED})); "
            f"pathlib.Path(r'{tmp_path}', 'ready' + os.environ['RANK']).touch(); time.sleep(60)")
    launcher = ("import sys; from launch.errors import RanksPreempted; from launch.local import run_local\n"
                f"try: run_local([sys.executable, '-c', {rank!r}], 2)\n"
                f"except RanksPreempted: sys.exit({EXIT_PREEMPTED})")
    root = str(Path(__file__).parents[2])
    proc = subprocess.Popen([sys.executable, "-c", launcher], env={**os.environ, "PYTHONPATH": root})
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED


def test_nproc_must_be_positive():
    with pytest.raises(LaunchError, match="nproc=0"):
        run_local(["true"], nproc=0)


def test_launch_local_cli_refuses_before_starting_ranks(tiny_config, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmforge", "launch", "local", "--nproc", "2", str(tiny_config),
                           f"run_dir={tmp_path / 'run'}", "model.vocab_size=256"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmforge")]
    assert len(errors) == 1 and "embedding has 256 rows" in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_launch_local_cli_preempted_exits_75_with_one_line_then_the_rerun_resumes_and_finishes(tiny_config, tmp_path):
    """The user's case: ``launch local`` with ``preemption.max_minutes`` must exit 75 with one line, not an error."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "lmforge", "launch", "local", "--nproc", "2", str(tiny_config),
               f"run_dir={run_dir}"]
    proc = subprocess.run([*command, "preemption.max_minutes=0.0001"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert "error" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == (  # the budget runs out after the first step
        f"lmforge: preempted at step 1 of 5, checkpoint {run_dir / 'checkpoints' / 'step_00000001'} saved "
        f"(exit code {EXIT_PREEMPTED}); rerun the same command to resume")
    assert not (run_dir / "summary.json").exists()
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step_00000001: step 1" in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    assert (run_dir / "checkpoints" / "step_00000005").is_dir()
