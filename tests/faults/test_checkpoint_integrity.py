"""A checkpoint damaged after its save (truncated, a flipped byte) is found before it is loaded or exported.

One 2-rank gloo run saves step 2 and step 4; a file of step 4 is truncated, as a flaky file system
leaves it; the resume falls back to step 2 by itself with one log line naming the file, and
``lmforge checkpoint verify`` names it and exits 1. A flipped byte (same size) is caught by the
checksum mode only; a training resume then falls back past it and trains the lost steps again to the same
losses, bit for bit. A corrupt state file is in test_save_writes.py.
"""
from __future__ import annotations

import os

import pytest

from lmforge.cli import main
from pretrain.checkpoint import STATE_FILE, read_state
from pretrain.config import load_config
from pretrain.errors import ExportError
from pretrain.export.run_info import resolve_checkpoint
from pretrain.integrity import DIGESTS_KEY, CheckpointIntegrityError, checkpoint_files
from pretrain.trainer import resume_point
from tests.pretrain.conftest import TINY, Ranks, losses_by_step


def _largest(record: dict) -> str:
    return max(record, key=lambda name: record[name]["bytes"])


def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def test_resume_falls_back_from_a_truncated_checkpoint_and_verify_names_the_file(tmp_path, tokenizer_dir, prepared_dir,
                                                                                  capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  path: {prepared_dir}\n  tokenizer: {tokenizer_dir}\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = [*TINY, f"run_dir={run_dir}", "checkpoint.save_every_steps=2"]
    assert Ranks(config, 2, [*args, "max_steps=4"], run_dir).wait() == [0, 0]
    ck = run_dir / "checkpoints"
    step2, step4 = ck / "step_00000002", ck / "step_00000004"
    record = read_state(step4)[DIGESTS_KEY]
    assert sorted(record) == checkpoint_files(step4, exclude=(STATE_FILE,)) and "probe.safetensors" in record
    assert "rng_state_rank1.pt" in record and not list(step4.glob("digests-rank*"))

    victim = _largest(record)
    os.truncate(step4 / victim, record[victim]["bytes"] // 2)
    assert main(["checkpoint", "verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert f"step_00000004: BAD: {victim}: {record[victim]['bytes'] // 2} bytes, recorded {record[victim]['bytes']}" in out
    assert "step_00000002: OK" in out and "a resume falls back to step_00000002" in out
    with pytest.raises(ExportError, match=f"step_00000004: BAD: {victim}"):
        resolve_checkpoint(run_dir)

    assert Ranks(config, 2, [*args, "max_steps=6"], run_dir).wait() == [0, 0]
    log = (run_dir / "rank0.log").read_text()
    why = [line for line in log.splitlines() if "fails verification" in line]
    assert len(why) == 1 and str(step4) in why[0] and victim in why[0], why
    assert "checkpoint step_00000002 verified (checksum" in log and "resumed from step_00000002: step 2" in log
    assert read_state(ck / "step_00000006")["step"] == 6

    step6 = ck / "step_00000006"
    record6 = read_state(step6)[DIGESTS_KEY]
    _flip_byte(step6 / victim, record6[victim]["bytes"] // 3)
    capsys.readouterr()
    assert main(["checkpoint", "verify", "--mode", "size", str(step6)]) == 0
    assert main(["checkpoint", "verify", str(step6)]) == 1
    assert f"step_00000006: BAD: {victim}: xxh3_128 " in capsys.readouterr().out

    base = [f"run_dir={run_dir}", "data.path=d", "data.tokenizer=t"]
    assert resume_point(load_config(None, [*base, "checkpoint.verify=size"])) == step6
    assert resume_point(load_config(None, base)) == ck / "step_00000004"
    with pytest.raises(CheckpointIntegrityError, match=f"step_00000006: BAD: {victim}"):
        resume_point(load_config(None, [*base, "checkpoint.resume=step_00000006"]))

    # a training resume past the flipped byte: back to step 4, and steps 5 and 6 trained again to the same losses
    before = losses_by_step(run_dir)
    assert Ranks(config, 2, [*args, "max_steps=8"], run_dir).wait() == [0, 0]
    log = (run_dir / "rank0.log").read_text()
    why = [line for line in log.splitlines() if "fails verification" in line]
    assert len(why) == 2 and str(step6) in why[1] and f"{victim}: xxh3_128 " in why[1], why
    assert "resumed from step_00000004: step 4" in log
    after = losses_by_step(run_dir)
    assert [after[s] for s in (5, 6)] == [before[s] for s in (5, 6)]  # bit for bit
    for tag_dir in (step2, ck / "step_00000004", ck / "step_00000006", ck / "step_00000008"):
        (tag_dir / "probe.safetensors").unlink(missing_ok=True)
    with pytest.raises(CheckpointIntegrityError, match="no checkpoint verifies .*probe.safetensors: missing"):
        resume_point(load_config(None, base))
