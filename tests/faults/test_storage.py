"""A full or limited file system (RLIMIT_FSIZE stands in for disk full and quotas): a checkpoint save that
cannot write leaves the previous checkpoint intact and loadable and ends the run with one line naming the
folder and the bytes needed; a prep that cannot write leaves no manifest and ends with such a line."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

from launch.local import rank_env
from lmforge.cli import main
from lmforge_common import free_port
from tests.pretrain.conftest import TINY


def _limit_file_size(max_bytes: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return preexec


def _lmforge(*args: str, max_file_bytes: int = 0, rank: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **(rank_env(0, 1, "127.0.0.1", free_port(), 2) if rank else {})}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(max_file_bytes) if max_file_bytes else None)


def test_a_checkpoint_save_that_cannot_write_keeps_the_previous_one(tmp_path, tokenizer_dir, prepared_dir, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  path: {prepared_dir}\n  tokenizer: {tokenizer_dir}\n")
    run_dir = tmp_path / "run"
    args = ["train", str(config), *TINY, f"run_dir={run_dir}"]
    first = _lmforge(*args, "max_steps=2", rank=True)
    assert first.returncode == 0, first.stderr[-3000:]
    ck = run_dir / "checkpoints"
    step2_files = sorted(p.relative_to(ck) for p in (ck / "step_00000002").rglob("*"))

    limited = _lmforge(*args, "max_steps=4", max_file_bytes=200_000, rank=True)  # model states: ~0.6 MB
    lines = [line for line in limited.stderr.splitlines() if "could not write the checkpoint" in line]
    assert limited.returncode == 2 and len(lines) == 1, limited.stderr[-3000:]
    assert f"{ck / '.tmp-step_00000004'}: rank 0 could not write the checkpoint (" in lines[0]
    needed = sum(p.stat().st_size for p in (ck / "step_00000002").rglob("*") if p.is_file() and p.name != "lmforge_state.json")
    assert f"it needs about {needed} bytes" in lines[0] and "the previous checkpoint is intact" in lines[0]
    assert "Traceback" not in limited.stderr
    assert sorted(p.name for p in ck.glob("*step_*")) == ["step_00000002"]  # the partial save was removed
    assert (ck / "latest").read_text() == "step_00000002"
    assert sorted(p.relative_to(ck) for p in (ck / "step_00000002").rglob("*")) == step2_files
    assert main(["checkpoint", "verify", str(run_dir)]) == 0 and "step_00000002: OK" in capsys.readouterr().out

    resumed = _lmforge(*args, "max_steps=3", rank=True)
    assert resumed.returncode == 0 and "resumed from step_00000002: step 2" in resumed.stderr, resumed.stderr[-3000:]


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
