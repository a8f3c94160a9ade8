"""A full or limited file system (RLIMIT_FSIZE stands in for disk full and quotas): a checkpoint save that
cannot write leaves the previous checkpoint intact and loadable and ends the run with one line naming the
folder and the bytes needed; a prep that cannot write leaves no manifest and ends with such a line."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from lmforge.cli import main
from tests.pretrain.conftest import TINY, Ranks


def _limit_file_size(max_bytes: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return preexec


def _lmforge(*args: str, max_file_bytes: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(max_file_bytes) if max_file_bytes else None)


def _train(tmp_path: Path, name: str, overrides: list[str], max_file_bytes: int = 0) -> tuple[list[int], list[str]]:
    """A 2-rank run of ``overrides``; its exit codes and each rank's output (logs kept apart per attempt)."""
    logs = tmp_path / name
    logs.mkdir()
    ranks = Ranks(tmp_path / "train.yaml", 2, overrides, logs,
                  preexec_fn=_limit_file_size(max_file_bytes) if max_file_bytes else None)
    return ranks.wait(), ranks.logs()


def test_a_checkpoint_save_that_cannot_write_keeps_the_previous_one(tmp_path, tokenizer_dir, prepared_dir, capsys):
    (tmp_path / "train.yaml").write_text(f"data:\n  path: {prepared_dir}\n  tokenizer: {tokenizer_dir}\n")
    run_dir = tmp_path / "run"
    args = [*TINY, f"run_dir={run_dir}"]
    codes, logs = _train(tmp_path, "first", [*args, "max_steps=2"])
    assert codes == [0, 0], logs[0][-3000:]
    ck = run_dir / "checkpoints"
    step2_files = sorted(p.relative_to(ck) for p in (ck / "step_00000002").rglob("*"))

    codes, logs = _train(tmp_path, "limited", [*args, "max_steps=4"], max_file_bytes=200_000)  # model states: ~0.6 MB
    assert codes == [2, 2], logs[0][-3000:] + logs[1][-3000:]
    lines = [line for log in logs for line in log.splitlines() if "could not write the checkpoint" in line]
    assert len(lines) == 1, lines  # one line for the run, from rank 0, though both ranks hit the limit
    assert f"{ck / '.tmp-step_00000004'}: rank 0 could not write the checkpoint (" in lines[0]
    needed = sum(p.stat().st_size for p in (ck / "step_00000002").rglob("*") if p.is_file() and p.name != "lmforge_state.json")
    assert f"it needs about {needed} bytes" in lines[0] and "the previous checkpoint is intact" in lines[0]
    assert not any("Traceback" in log for log in logs)
    assert sorted(p.name for p in ck.glob("*step_*")) == ["step_00000002"]  # the partial save was removed
    assert (ck / "latest").read_text() == "step_00000002"
    assert sorted(p.relative_to(ck) for p in (ck / "step_00000002").rglob("*")) == step2_files
    assert main(["checkpoint", "verify", str(run_dir)]) == 0 and "step_00000002: OK" in capsys.readouterr().out

    codes, logs = _train(tmp_path, "resumed", [*args, "max_steps=3"])
    assert codes == [0, 0] and "resumed from step_00000002: step 2" in logs[0], logs[0][-3000:]


def test_a_prep_that_cannot_write_leaves_no_manifest(tmp_path, tokenizer_dir, corpus_dirs):
    out = tmp_path / "data"
    prep = ["prep", "--input", *corpus_dirs, "--tokenizer", str(tokenizer_dir), "--output", str(out), "--seq-len", "64",
            "--sequences-per-shard", "100000", "--workers", "1", "--no-progress"]
    ran = _lmforge(*prep, max_file_bytes=100_000)  # one shard of ~0.3 MB
    lines = [line for line in ran.stderr.splitlines() if "prep could not write its shards" in line]
    assert ran.returncode == 2 and len(lines) == 1 and "Traceback" not in ran.stderr, ran.stderr[-3000:]
    assert lines[0].startswith(f"lmforge: {out}: prep could not write its shards (") or f" {out}: prep" in lines[0], lines
    assert "it needs about " in lines[0] and "no manifest was written" in lines[0]
    assert not (out / "manifest.json").exists()
