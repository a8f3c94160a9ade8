import json
import subprocess
import sys
import time

import pytest

from launch.errors import LaunchError
from launch.local import run_local


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


def test_nproc_must_be_positive():
    with pytest.raises(LaunchError, match="nproc=0"):
        run_local(["true"], nproc=0)


def test_launch_local_cli_trains_on_two_ranks(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "launch", "local", "--nproc", "2", str(tiny_config),
                           f"run_dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    assert (run_dir / "checkpoints" / "step_00000005").is_dir()


def test_launch_local_cli_refuses_before_starting_ranks(tiny_config, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmforge", "launch", "local", "--nproc", "2", str(tiny_config),
                           f"run_dir={tmp_path / 'run'}", "model.vocab_size=256"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmforge")]
    assert len(errors) == 1 and "embedding has 256 rows" in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()
