"""A run folder stands on its own: export, resume and ``lmforge verify`` work from another directory, after
the run folder moved and the original tokenizer folder was deleted (the run keeps its own copy). The resume is
``lmforge train MOVED/config.yaml`` with no ``run_dir=``: a run folder's own config.yaml names that folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from data_prep.tokenizer.folder import fingerprint
from pretrain.checkpoint import read_state
from pretrain.config import load_config
from tests.pretrain.conftest import TINY, Ranks


def _lmforge(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=300)


def _train(cwd: Path, config: str, overrides: list[str], logs: Path) -> str:
    """A 2-rank run started in ``cwd``; rank 0's output (the test fails with it unless both ranks exit 0)."""
    logs.mkdir()
    ranks = Ranks(Path(config), 2, overrides, logs, cwd=cwd)
    codes = ranks.wait()
    assert codes == [0, 0], ranks.logs()[0][-3000:] + ranks.logs()[1][-3000:]
    return ranks.logs()[0]


def test_run_folder_moved_without_its_tokenizer_exports_resumes_and_verifies_from_elsewhere(tmp_path, tokenizer_dir,
                                                                                            prepared_dir):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(tokenizer_dir, start / "tok")
    (start / "data").symlink_to(prepared_dir)
    (start / "train.yaml").write_text("data:\n  path: data\n  tokenizer: tok\n")  # relative to the start directory
    _train(start, "train.yaml", [*TINY, "run_dir=runs/r", "max_steps=2"], tmp_path / "logs-first")
    run_dir = start / "runs" / "r"
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert recorded["tokenizer"] == str((run_dir / "tokenizer").resolve()) and recorded["path"] == str(start / "data")
    assert fingerprint(run_dir / "tokenizer") == fingerprint(tokenizer_dir)
    state = read_state(run_dir / "checkpoints" / "step_00000002")
    assert state["tokenizer_dir"] == "tokenizer" and str(start / "data") in state["config_yaml"]

    moved = tmp_path / "moved" / "r"
    moved.parent.mkdir()
    shutil.move(run_dir, moved)
    shutil.rmtree(start / "tok")
    exported = _lmforge(elsewhere, "export", str(moved), "hf", "--no-verify")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert fingerprint(elsewhere / "hf") == fingerprint(tokenizer_dir)
    verified = _lmforge(elsewhere, "verify", "hf", "--probe", str(moved / "checkpoints" / "step_00000002" / "probe.safetensors"))
    assert verified.returncode == 0 and "logits match the trained model's" in verified.stdout, verified.stderr[-3000:]
    # the run folder's own config.yaml names that folder as run_dir (it records the relative runs/r), unless overridden
    assert yaml.safe_load((moved / "config.yaml").read_text())["run_dir"] == "runs/r"
    assert load_config(moved / "config.yaml").run_dir == str(moved.resolve())
    assert load_config(moved / "config.yaml", ["run_dir=other"]).run_dir == "other"
    assert load_config(start / "train.yaml").run_dir == "runs/train"  # any other config file: as written
    resumed = _train(elsewhere, str(moved / "config.yaml"), ["max_steps=3"], tmp_path / "logs-resumed")  # no run_dir=
    assert "resumed from step_00000002: step 2" in resumed
    assert read_state(moved / "checkpoints" / "step_00000003")["step"] == 3
    assert not (elsewhere / "runs").exists() and not run_dir.exists()  # no new run started beside it
