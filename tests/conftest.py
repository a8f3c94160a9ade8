"""Shared fixtures: a small real corpus (a slice of the standard library), a tokenizer and prepared data.

Session-scoped, so the suite trains one tokenizer and prepares one dataset.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

ASSETS = Path(__file__).parent / "assets"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def corpus_dirs() -> list[str]:
    """About 0.9 MB of real Python source: three standard-library packages."""
    return [str(STDLIB / name) for name in ("json", "email", "asyncio")]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dirs) -> Path:
    from data_prep.tokenizer.train import train_byte_bpe

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_byte_bpe(corpus_dirs, out, vocab_size=512, model_max_length=64)
    return out


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, corpus_dirs, tokenizer_dir) -> Path:
    from data_prep.prep import PrepConfig, prepare

    out = tmp_path_factory.mktemp("data") / "data"
    prepare(PrepConfig(inputs=corpus_dirs, tokenizer=str(tokenizer_dir), output=str(out), seq_len=64,
                       val_fraction=0.1, sequences_per_shard=1000, show_progress=False))
    return out
