"""Fixtures for the tokenizer tests: one tokenizer of every family, trained once per session on a small real corpus."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent.parent / "assets"
PROSE = str(ASSETS / "prose.jsonl")
"""Twenty short sentences in eight languages and scripts, with emoji, tabs and double spaces (x3)."""
FAMILY_VOCAB = 700


@pytest.fixture(scope="session")
def family_corpus() -> list[str]:
    """About 240 KB: the stdlib json package (code) plus the multilingual prose asset."""
    return [str(Path(sysconfig.get_paths()["stdlib"]) / "json"), PROSE]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, family_corpus) -> dict[str, Path]:
    """One trained folder per family. bpe pads on the left and has an extra special token."""
    from data_prep.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    root = tmp_path_factory.mktemp("families")
    options = {
        "byte-bpe": {"model_max_length": 128},
        "bpe": {"padding_side": "left", "extra_special_tokens": ["<|tool|>"]},
        "wordpiece": {},
        "unigram": {},
    }
    dirs = {}
    for family, extra in options.items():
        dirs[family] = root / family
        train_tokenizer(TokenizerTrainConfig(inputs=family_corpus, output=str(dirs[family]), family=family,
                                             vocab_size=FAMILY_VOCAB, **extra))
    return dirs
