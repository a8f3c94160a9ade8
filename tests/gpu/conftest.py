"""The GPU lane: short real runs on one CUDA device (nccl, bf16); every test here is skipped without CUDA.

Run with ``pytest tests/gpu`` on a GPU machine. Ranks are started like ``tests/pretrain``'s, but with
the CUDA accelerator (``DS_ACCELERATOR=cuda``), so the trainer picks nccl and the device itself.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.local import rank_env
from lmforge_common import free_port
from tests.pretrain.conftest import TINY

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU lane needs one")


def pytest_collection_modifyitems(config, items):
    """Every test of this folder is CUDA-only."""
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(requires_cuda)


@pytest.fixture
def gpu_run(tmp_path, tokenizer_dir, prepared_dir):
    """``gpu_run(run_name, *overrides) -> run_dir``: one rank on GPU 0 (bf16, nccl), waited for; asserts exit 0."""
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  path: {prepared_dir}\n  tokenizer: {tokenizer_dir}\n")

    def run(run_name: str, *overrides: str) -> Path:
        run_dir = tmp_path / run_name
        env = {**os.environ, "DS_ACCELERATOR": "cuda", **rank_env(0, 1, "127.0.0.1", free_port(), 4)}
        proc = subprocess.run([sys.executable, "-m", "lmforge", "train", str(config), *TINY, "deepspeed.precision=bf16",
                               f"run_dir={run_dir}", *overrides], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (run_dir / "rank0.log").write_text(proc.stdout + proc.stderr)
        return run_dir

    return run
