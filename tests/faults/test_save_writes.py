"""The rank-0 end of a save and the state file, in one process (a world of one gloo rank, a stand-in engine that
writes a file as DeepSpeed would; no model, so each case takes milliseconds):

- a write error at any write of a save (DeepSpeed's files, the digest files, the probe, the state file) ends the
  save with one :class:`CheckpointWriteError` line naming the folder and the bytes needed, removes the partial
  folder and leaves the previous checkpoint as it was. The error is real: the write runs under a file size
  limit of 0 bytes (``RLIMIT_FSIZE``, ``debug.write_error_in_save``), so the kernel refuses it with EFBIG, as a
  full disk or quota refuses it with ENOSPC / EDQUOT (the same code path).
- a corrupt ``lmforge_state.json`` (truncated, or a changed value that still parses) makes its checkpoint bad for
  resume, ``lmforge checkpoint verify`` and export, each naming the file; resume falls back to the previous
  checkpoint with one log line.

The same faults on real 2-rank runs, with losses compared bit for bit, are cases of ``bench/fault_matrix.py``.
"""
from __future__ import annotations

import json
import logging
import os

import pytest

from lmforge.cli import main
from pretrain import checkpoint
from pretrain.checkpoint import STATE_FILE, WRITE_POINTS, CheckpointWriteError, TrainState, read_state
from pretrain.config import load_config
from pretrain.errors import ExportError
from pretrain.export.run_info import resolve_checkpoint
from pretrain.integrity import StateFileError
from pretrain.trainer import resume_point

MODEL_BYTES = 50_000


class _Engine:
    """What :func:`pretrain.checkpoint.save` uses of a DeepSpeed engine: ``save_checkpoint`` and the parameters."""

    def __init__(self):
        import torch

        self.module = torch.nn.Linear(10, 10)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as fh:
            fh.write(os.urandom(MODEL_BYTES))


@pytest.fixture
def one_rank():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _probe():
    import torch

    return {"tensors": {"logits": torch.zeros(2, 3)}, "metadata": {"precision": "fp32"}}


def _save(root, step: int, write_error: str = ""):
    return checkpoint.save(_Engine(), root, TrainState(step=step), 0, {"world_size": 1, "val_start": {"val_loss": 1.5}},
                           probe_fn=_probe, write_error=write_error)


def test_a_write_error_at_any_write_of_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, one_rank):
    root = tmp_path / "checkpoints"
    step2 = _save(root, 2)
    before = {p.name: p.read_bytes() for p in step2.iterdir()}
    assert (root / "latest").read_text() == "step_00000002"
    for point in WRITE_POINTS[1:]:
        with pytest.raises(CheckpointWriteError) as failed:
            _save(root, 4, write_error=point)
        line = str(failed.value)
        assert "\n" not in line and line.startswith(f"{root / '.tmp-step_00000004'}: rank 0 could not write the checkpoint ("), line
        assert f"it needs about {sum(len(b) for n, b in before.items() if n != STATE_FILE)} bytes" in line, (point, line)
        assert "the previous checkpoint is intact" in line
        assert "File too large" in line or "torch.save write failed" in line, (point, line)
        assert sorted(p.name for p in root.iterdir() if "step_" in p.name) == ["step_00000002"], point
        assert (root / "latest").read_text() == "step_00000002"
        assert {p.name: p.read_bytes() for p in step2.iterdir()} == before, point
    assert _save(root, 4).name == "step_00000004"  # the limit was lifted after each failure: the next save works
    assert read_state(root / "step_00000004")["step"] == 4


def test_a_corrupt_state_file_is_a_bad_checkpoint_for_resume_verify_and_export(tmp_path, one_rank, capsys, caplog):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    for step in (2, 4, 6):
        _save(root, step)
    state4, state6 = root / "step_00000004" / STATE_FILE, root / "step_00000006" / STATE_FILE
    assert read_state(state6.parent)["val_start"] == {"val_loss": 1.5}  # the digest key is not part of the state
    os.truncate(state6, state6.stat().st_size // 2)  # a partial copy
    edited = json.loads(state4.read_text())
    edited["step"] = 5  # a change that still parses: caught by the state file's own digest
    state4.write_text(json.dumps(edited))
    with pytest.raises(StateFileError, match=f"{state6}: unreadable"):
        read_state(state6.parent)
    with pytest.raises(StateFileError, match=f"{state4}: content xxh3_128 [0-9a-f]+, recorded [0-9a-f]+"):
        read_state(state4.parent)

    base = [f"run_dir={run_dir}", "data.path=d", "data.tokenizer=t"]
    with caplog.at_level(logging.INFO):
        assert resume_point(load_config(None, base)) == root / "step_00000002"
    why = [r.getMessage() for r in caplog.records if "fails verification" in r.getMessage()]
    assert len(why) == 2 and f"{state6.parent} fails verification ({STATE_FILE}: unreadable" in why[0], why
    assert f"{state4.parent} fails verification ({STATE_FILE}: content xxh3_128" in why[1], why

    capsys.readouterr()
    assert main(["checkpoint", "verify", str(run_dir)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{state6.parent}: BAD: {STATE_FILE}: unreadable (") and "Traceback" not in "\n".join(out)
    assert out[1].startswith(f"{state4.parent}: BAD: {STATE_FILE}: content xxh3_128 ")
    assert out[2].startswith(f"{root / 'step_00000002'}: OK")
    assert "a resume falls back to step_00000002" in out[-1]
    with pytest.raises(ExportError, match=f"step_00000006: BAD: {STATE_FILE}: unreadable"):
        resolve_checkpoint(run_dir)
    assert resolve_checkpoint(root / "step_00000002") == root / "step_00000002"
