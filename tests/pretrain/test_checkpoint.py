"""The checkpoint folder rules, on hand-made folders: what counts as complete, what resume picks, what pruning keeps."""
import json

import pytest

from data_prep.errors import UserError
from pretrain.checkpoint import STATE_FILE, complete_checkpoints, latest_complete, prune
from pretrain.config import load_config
from pretrain.trainer import resume_point


def _make(root, step, complete=True, tmp=False):
    path = root / ((".tmp-" if tmp else "") + f"step_{step:08d}")
    path.mkdir(parents=True)
    if complete:
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_only_renamed_folders_with_a_state_file_are_complete(tmp_path):
    _make(tmp_path, 4)
    _make(tmp_path, 8, complete=False)  # DeepSpeed files but no lmforge state: killed mid-save
    _make(tmp_path, 12, tmp=True)
    (tmp_path / "step_00000016").write_text("a file, not a checkpoint")
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4]
    assert latest_complete(tmp_path).name == "step_00000004"
    assert latest_complete(tmp_path / "missing") is None


def test_prune_keeps_the_newest_and_every_nth(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _make(tmp_path, step)
    _make(tmp_path, 60, tmp=True)
    prune(tmp_path, keep_last=2, keep_every_steps=20)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [20, 40, 50]
    assert not list(tmp_path.glob(".tmp-*"))


def test_resume_modes(tmp_path):
    base = [f"run_dir={tmp_path}", "data.path=d", "data.tokenizer=t"]
    assert resume_point(load_config(None, base)) is None
    _make(tmp_path / "checkpoints", 5)
    _make(tmp_path / "checkpoints", 9)
    assert resume_point(load_config(None, base)).name == "step_00000009"
    assert resume_point(load_config(None, [*base, "checkpoint.resume=step_00000005"])).name == "step_00000005"
    with pytest.raises(UserError, match="holds checkpoint step_00000009 and checkpoint.resume=never"):
        resume_point(load_config(None, [*base, "checkpoint.resume=never"]))
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resume_point(load_config(None, [*base, "checkpoint.resume=step_00000007"]))
