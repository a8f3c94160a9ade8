"""``lmforge demo`` for the other objectives at tiny scale, and the ModernBERT recipe config.

Each demo runs once per module (a fixture): WordPiece -> MLM shards -> a 2-layer ModernBERT on 2 ranks -> a
verified export answering fill-mask; byte-level BPE with FIM sentinels -> FIM shards -> llama-test -> an export
that infills and whose card shows how.
"""
import json

import pytest

from lmforge.demo import FILL_MASK_SENTENCE, DemoConfig, DemoError, config_path, run_demo
from pretrain.config import load_config

TINY = ["max_steps=8", "log_every_steps=4", "optim.warmup_steps=2", "deepspeed.micro_batch_size=4",
        "data.eval_batches=2", "show_progress=false"]


def test_modernbert_recipe_config_loads_with_the_papers_masking():
    cfg = load_config(config_path("modernbert.yaml"), ["data.path=x", "data.tokenizer=y"])
    assert (cfg.mlm.probability, cfg.mlm.eval_probability) == (0.3, 0.15)
    assert cfg.data.document_masking and cfg.model.preset == "modernbert-base" and cfg.seq_len == 1024
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.betas) == (8e-4, "wsd", [0.9, 0.98])


def test_fim_does_not_go_with_mlm(tmp_path):
    with pytest.raises(DemoError, match="--fim"):
        run_demo(DemoConfig(output=str(tmp_path), objective="mlm", fim=True))
    assert not any(tmp_path.iterdir())  # refused before any stage wrote anything
