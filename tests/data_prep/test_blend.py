import numpy as np
import pytest

from data_prep.blend import BlendedReader, blend_counts
from data_prep.errors import UserError
from data_prep.prep import PrepConfig, prepare
from data_prep.shards import ShardReader


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory, tokenizer_dir, corpus_dirs):
    """Two more datasets with the session tokenizer: one compatible with prepared_dir, one with another seq_len."""
    root = tmp_path_factory.mktemp("blend")
    out = {}
    for name, seq_len in (("json64", 64), ("json32", 32)):
        prepare(PrepConfig(inputs=corpus_dirs[:1], tokenizer=str(tokenizer_dir), output=str(root / name), seq_len=seq_len,
                           val_fraction=0.0, workers=1, show_progress=False))
        out[name] = root / name
    return out


def test_counts_follow_the_weights_in_every_prefix(prepared_dir, small_dirs):
    a, b = ShardReader(prepared_dir), ShardReader(small_dirs["json64"])
    blend = BlendedReader([a, b], [0.7, 0.3], num_samples=1000, seed=5)
    assert len(blend) == 1000
    which = np.array([blend.locate(i)[0] for i in range(1000)])
    assert (which == 0).sum() == 700
    for n in (10, 37, 333, 1000):  # proportional interleave: every prefix within one sample of its share
        assert abs((which[:n] == 1).sum() - 0.3 * n) <= 1
    d, i = blend.locate(17)
    assert (blend[17] == [a, b][d][i]).all() and blend.document_starts(17) == [a, b][d].document_starts(i)
    batch = blend.batch([0, 1, 2])
    assert batch.shape == (3, 64) and batch.dtype == np.int64
    assert blend.batch_num_tokens([0, 1]).tolist() == [64, 64]
    ids, starts, nums = blend.read_batch([17, 3, 900])  # what micro_batches reads: one locate per sample
    assert (ids == np.stack([blend[k] for k in (17, 3, 900)])).all() and nums.tolist() == [64, 64, 64]
    assert starts == [blend.document_starts(k) for k in (17, 3, 900)]
    assert blend.manifest["blend"][1]["samples"] == 300 and blend.seq_len == 64


def test_blend_is_deterministic_per_seed_and_repeats_small_datasets_in_fresh_orders(prepared_dir, small_dirs):
    dirs = [prepared_dir, small_dirs["json64"]]
    one = BlendedReader.from_dirs(dirs, [1, 3], seed=1)
    again = BlendedReader.from_dirs(dirs, [1, 3], seed=1)
    other = BlendedReader.from_dirs(dirs, [1, 3], seed=2)
    picks = [one.locate(i) for i in range(len(one))]
    assert picks == [again.locate(i) for i in range(len(one))]
    assert picks != [other.locate(i) for i in range(len(one))]
    small = len(one.readers[1])
    drawn = [i for d, i in picks if d == 1]
    assert len(drawn) > 2 * small  # the small dataset is repeated ...
    assert sorted(drawn[:small]) == list(range(small))  # ... each epoch a full permutation
    assert drawn[:small] != drawn[small:2 * small]  # ... in a fresh order


def test_blend_counts_sum_exactly():
    assert blend_counts([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert blend_counts([0.5, 0.25, 0.25], 7).sum() == 7


def test_incompatible_datasets_are_refused_with_every_problem(prepared_dir, small_dirs):
    with pytest.raises(UserError, match=r"weight -1 of .*json32 must be > 0; .*json32 has seq_len 32, .* has 64"):
        BlendedReader.from_dirs([prepared_dir, small_dirs["json32"]], [1, -1])
    with pytest.raises(UserError, match="1 datasets but 2 weights"):
        BlendedReader.from_dirs([prepared_dir], [1, 2])
