"""Fixtures for the tokenizer tests: one tokenizer of every family, trained once per session on a small real corpus,
and each model type retrained from a folder (``from_pretrained``)."""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import pytest

ASSETS = Path(__file__).parent.parent / "assets"
PROSE = str(ASSETS / "prose.jsonl")
"""Twenty short sentences in eight languages and scripts, with emoji, tabs and double spaces (x3)."""
FAMILY_VOCAB = 700
RETRAIN_VOCAB = 400
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {  # bpe pads on the left and has an extra special token
    "byte-bpe": {"model_max_length": 128},
    "bpe": {"padding_side": "left", "extra_special_tokens": ["<|tool|>"]},
    "wordpiece": {},
    "unigram": {},
}


def family_configs(corpus: list[str], root: Path) -> dict[str, dict]:
    """``TokenizerTrainConfig`` arguments of the session's family tokenizers, writing under ``root``."""
    return {family: {"inputs": corpus, "output": str(root / family), "family": family, "vocab_size": FAMILY_VOCAB, **options}
            for family, options in FAMILY_OPTIONS.items()}


def retrain_configs(sources: dict[str, Path], root: Path) -> dict[str, dict]:
    """``TokenizerTrainConfig`` arguments retraining each source folder on the prose, writing under ``root``."""
    return {name: {"inputs": [PROSE], "output": str(root / name), "from_pretrained": str(source),
                   "vocab_size": RETRAIN_VOCAB, "padding_side": "left"} for name, source in sources.items()}


def train_all(configs: dict[str, dict]) -> dict[str, Path]:
    from data_prep.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    for config in configs.values():
        train_tokenizer(TokenizerTrainConfig(**config))
    return {name: Path(config["output"]) for name, config in configs.items()}


@pytest.fixture(scope="session")
def family_corpus() -> list[str]:
    """About 240 KB: the stdlib json package (code) plus the multilingual prose asset."""
    return [str(Path(sysconfig.get_paths()["stdlib"]) / "json"), PROSE]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, family_corpus) -> dict[str, Path]:
    """One trained folder per family (:data:`FAMILY_OPTIONS`)."""
    return train_all(family_configs(family_corpus, tmp_path_factory.mktemp("families")))


@pytest.fixture(scope="session")
def pretrained_sources(tmp_path_factory, family_dirs) -> dict[str, Path]:
    """Folders of every model type ``from_pretrained`` retrains: the families, a BPE whose symbols carry a
    continuing-subword prefix and an end-of-word suffix, and a WordLevel (both built with ``tokenizers``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("sources")
    affixes: dict[str, Any] = {"continuing_subword_prefix": "##", "end_of_word_suffix": "</w>"}
    built: dict[str, tuple[models.Model, trainers.BpeTrainer | trainers.WordLevelTrainer]] = {
        "bpe-affixes": (models.BPE(unk_token="<unk>", **affixes), trainers.BpeTrainer(vocab_size=200, **affixes)),
        "wordlevel": (models.WordLevel(unk_token="<unk>"), trainers.WordLevelTrainer(vocab_size=100)),
    }
    sources = dict(family_dirs)
    for name, (model, trainer) in built.items():
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer.special_tokens = ["<unk>"]
        tok.train([PROSE], trainer)
        sources[name] = root / name
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(sources[name]))
    return sources


@pytest.fixture(scope="session")
def retrained_dirs(tmp_path_factory, pretrained_sources) -> dict[str, Path]:
    """Every source of :func:`pretrained_sources` retrained on the prose (vocab 400, padding on the left)."""
    return train_all(retrain_configs(pretrained_sources, tmp_path_factory.mktemp("retrained")))
