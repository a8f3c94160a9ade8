"""sbatch rendering against golden files (regenerate with LMFORGE_UPDATE_GOLDEN=1), option validation, dry runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.errors import LaunchError
from launch.sbatch_scripts import render_prep_scripts, render_train_script
from launch.slurm import SlurmOptions, parse_time_s
from lmforge.cli import main

GOLDEN = Path(__file__).parent / "golden"
PY = "/opt/venv/bin/python"
TRAIN = [PY, "-m", "lmforge", "train", "/work/configs/llama-1b.yaml", "optim.lr=3e-4", "run_dir=runs/llama 1b"]

TRAIN_CASES = {
    "train_cpu_two_nodes": SlurmOptions(nodes=2),
    "train_gpu_all_options": SlurmOptions(nodes=4, gpus_per_node=8, cpus_per_task=12, partition="gpu", account="proj42",
                                          qos="high", time="2-00:00:00", constraint="a100&ib", exclusive=True, mem="0",
                                          job_name="llama-1b", signal_grace_s=600, socket_ifname="ib0"),
    "train_gpu_no_preemption": SlurmOptions(nodes=1, gpus_per_node=4, time="04:00:00", output="/logs/%j.out",
                                            preemption=False),
}


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LMFORGE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file (LMFORGE_UPDATE_GOLDEN=1 to accept)"
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # and bash can parse it


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_train_script_matches_golden(name):
    _check_golden(f"{name}.sbatch", render_train_script(TRAIN_CASES[name], TRAIN, "/work/runs/llama 1b", "/work"))


def test_prep_array_and_merge_scripts_match_golden():
    opts = SlurmOptions(partition="cpu", time="01:30:00", cpus_per_task=8, mem="32G")
    array, merge = render_prep_scripts(opts, PY, ["--input", "corpus/*.jsonl", "--tokenizer", "tok", "--seq-len", "2048"],
                                       "/work/data/web", 16, "/work", max_parallel=4)
    _check_golden("prep_array.sbatch", array)
    _check_golden("prep_merge.sbatch", merge)


def test_preemption_lines_follow_the_options():
    on = render_train_script(SlurmOptions(time="60", signal_grace_s=90), TRAIN, "/r", "/w")
    off = render_train_script(SlurmOptions(preemption=False), TRAIN, "/r", "/w")
    assert "#SBATCH --signal=USR1@90\n#SBATCH --requeue\n" in on and 'scontrol requeue "$SLURM_JOB_ID"' in on
    assert "--signal" not in off and "requeue" not in off


def test_time_formats():
    assert [parse_time_s(t) for t in ("90", "90:30", "1:02:03", "2-00", "2-01:30", "2-01:30:15", "UNLIMITED")] == \
        [5400, 5430, 3723, 172800, 178200, 178215, None]


def test_every_bad_option_is_named_at_once():
    opts = SlurmOptions(nodes=0, gpus_per_node=-1, mem="64GB", time="1h", partition="a b")
    with pytest.raises(LaunchError) as exc:
        opts.validate()
    msg = str(exc.value)
    assert "\n" not in msg
    for part in ("--nodes 0 (allowed: >= 1)", "--gpus-per-node -1", "--mem '64GB'", "--time '1h' is not a Slurm time limit",
                 "--partition 'a b'"):
        assert part in msg
    with pytest.raises(LaunchError, match=r"--signal-grace-s 300 is not below --time 5 \(300 s\)"):
        SlurmOptions(time="5").validate()


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/x\ndata: {path: data, tokenizer: tok}\n")
    return path


def test_dry_run_prints_the_script_and_writes_nothing(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["launch", "slurm", str(config), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--dry-run",
               "max_steps=7"])
    out = capsys.readouterr().out
    assert rc == 0
    expected = render_train_script(SlurmOptions(nodes=2, gpus_per_node=4, partition="gpu"),
                                   [sys.executable, "-m", "lmforge", "train", str(config), "max_steps=7"],
                                   str(tmp_path / "runs" / "x"), str(tmp_path))
    assert out == expected
    assert not (tmp_path / "runs").exists()
    rc = main(["launch", "slurm-prep", "--num-tasks", "3", "--output", "data", "--dry-run", "--", "--input", "c.jsonl"])
    out = capsys.readouterr().out
    assert rc == 0 and "#SBATCH --array=0-2" in out and f"prep merge {tmp_path / 'data'}" in out


def test_bad_options_exit_2_with_one_line(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "slurm", str(config), "--nodes", "0", "--time", "2h", "--dry-run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["lmforge: error: invalid Slurm options: --nodes 0 (allowed: >= 1); --time '2h' is not a Slurm time "
                   "limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"]
    assert main(["launch", "slurm-prep", "--num-tasks", "2", "--output", "d", "--dry-run", "--", "--output", "e"]) == 2
    assert "slurm-prep sets --output itself" in capsys.readouterr().err


def test_a_dead_rank_ends_the_step_and_is_diagnosed_in_the_batch_log():
    script = render_train_script(SlurmOptions(nodes=2), TRAIN, "/work/runs/r", "/work")
    assert "srun --kill-on-bad-exit=1 " in script  # a rank that dies brings the others down at once
    assert f"{PY} -m launch.diagnose --run-dir /work/runs/r --" in script  # each rank runs under the watcher
    assert 'grep -h "^lmforge: rank .* was killed by" "$LOG_DIR/$SLURM_JOB_ID-rank"*.log' in script
