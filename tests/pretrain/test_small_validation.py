"""A validation split smaller than one micro batch per rank is evaluated (a padded, masked last batch);
an empty one is refused at start with the prep --val-fraction that would give one. Never a silent NaN."""
import json
import math

import numpy as np
import pytest

from data_prep.shards import ShardReader
from pretrain.data import eval_batches
from pretrain.inputs import IGNORE_INDEX, causal_lm_inputs


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, corpus_dirs, tokenizer_dir):
    """The json package alone (5 documents): ``val_fraction`` 0.05 holds out 24 sequences of 64 tokens, 0 none."""
    from data_prep.prep import PrepConfig, prepare

    out = {}
    for fraction in (0.0, 0.05):
        out[fraction] = tmp_path_factory.mktemp("small") / "data"
        prepare(PrepConfig(inputs=[corpus_dirs[0]], tokenizer=str(tokenizer_dir), output=str(out[fraction]), seq_len=64,
                           val_fraction=fraction, show_progress=False))
    return out


def test_a_split_smaller_than_a_micro_batch_per_rank_gets_one_padded_batch_per_rank(small_data):
    reader = ShardReader(small_data[0.05], "val")
    n = len(reader)
    assert 16 < n < 32  # the case: 2 ranks x micro batch 16 is more than the split
    got = [list(eval_batches(reader, rank, 2, 16, max_batches=4)) for rank in range(2)]
    assert [len(g) for g in got] == [1, 1] and got[0][0].input_ids.shape == got[1][0].input_ids.shape == (16, 64)
    first, second = got[0][0], got[1][0]
    assert first.sample_indices.tolist() == list(range(16)) and (first.num_tokens == 64).all()
    assert second.sample_indices.tolist() == list(range(16, n)) + [-1] * (32 - n)
    assert second.num_tokens.tolist() == [64] * (n - 16) + [0] * (32 - n)
    labels = causal_lm_inputs(second, document_masking=True)["labels"]
    assert (labels[n - 16:] == IGNORE_INDEX).all() and (labels[:n - 16] != IGNORE_INDEX).any()
    assert list(eval_batches(ShardReader(small_data[0.0], "val"), 0, 2, 16, max_batches=4)) == []


def test_training_evaluates_a_tiny_split_and_refuses_an_empty_one(start_run, small_data, tmp_path):
    tiny = ["max_steps=1", "deepspeed.micro_batch_size=32", "data.eval_batches=4"]
    assert start_run("tiny_val", 1, f"data.path={small_data[0.05]}", *tiny).wait() == [0]
    summary = json.loads((tmp_path / "tiny_val" / "summary.json").read_text())
    assert math.isfinite(summary["val_loss_start"]) and math.isfinite(summary["val_loss_end"])
    records = [json.loads(line) for line in (tmp_path / "tiny_val" / "metrics.jsonl").read_text().splitlines()]
    val_tokens = [r["val_tokens"] for r in records if "val_tokens" in r]
    assert len(val_tokens) == 2 and 0 < val_tokens[0] < 24 * 64 and np.unique(val_tokens).size == 1

    assert start_run("no_val", 1, f"data.path={small_data[0.0]}", *tiny).wait() == [2]
    log = (tmp_path / "no_val" / "rank0.log").read_text()
    assert (f"lmforge: error: {small_data[0.0]}: the validation split holds 0 sequences (prep --val-fraction 0.0 of 5 "
            "documents), so validation loss would be NaN; rerun lmforge prep with --val-fraction 0.5") in log, log[-2000:]
    assert not (tmp_path / "no_val" / "metrics.jsonl").exists()
