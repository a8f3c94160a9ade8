"""Blends: proportions in every window, fresh orders per pass, ranks' disjoint slices at 10T tokens by index math."""
import tracemalloc

import numpy as np
import pytest

from data_prep.blend import BlendedReader, BlendOrder
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
    assert abs((which == 0).sum() - 700) <= 1
    for n in (10, 37, 333, 1000):  # proportional interleave: every prefix within two samples of its share
        assert abs((which[:n] == 1).sum() - 0.3 * n) <= 2
    d, i = blend.locate(17)
    assert (blend[17] == [a, b][d][i]).all() and blend.document_starts(17) == [a, b][d].document_starts(i)
    batch = blend.batch([0, 1, 2])
    assert batch.shape == (3, 64) and batch.dtype == np.int64
    assert blend.batch_num_tokens([0, 1]).tolist() == [64, 64]
    ids, starts, nums = blend.read_batch([17, 3, 900])  # what micro_batches reads: one locate per sample
    assert (ids == np.stack([blend[k] for k in (17, 3, 900)])).all() and nums.tolist() == [64, 64, 64]
    assert starts == [blend.document_starts(k) for k in (17, 3, 900)]
    counts = [b["samples"] for b in blend.manifest["blend"]]
    assert sum(counts) == 1000 and counts == np.bincount(which).tolist() and blend.seq_len == 64
    assert (blend[5000] == [a, b][blend.locate(5000)[0]][blend.locate(5000)[1]]).all()  # endless: past len() too


def test_blend_is_deterministic_per_seed_and_repeats_small_datasets_in_fresh_orders(prepared_dir, small_dirs):
    dirs = [prepared_dir, small_dirs["json64"]]
    one = BlendedReader.from_dirs(dirs, [1, 3], seed=1)
    again = BlendedReader.from_dirs(dirs, [1, 3], seed=1)
    other = BlendedReader.from_dirs(dirs, [1, 3], seed=2)
    everything = np.arange(len(one))
    picks = list(zip(*(a.tolist() for a in one.order.locate(everything))))
    assert picks == list(zip(*(a.tolist() for a in again.order.locate(everything))))
    assert picks != list(zip(*(a.tolist() for a in other.order.locate(everything))))
    assert picks[:50] == [one.locate(i) for i in range(50)]
    small = len(one.readers[1])
    drawn = [i for d, i in picks if d == 1]
    assert len(drawn) > 2 * small  # the small dataset is repeated ...
    assert sorted(drawn[:small]) == list(range(small))  # ... each epoch a full permutation
    assert drawn[:small] != drawn[small:2 * small]  # ... in a fresh order


def test_blend_counts_sum_exactly_and_match_the_assignment():
    order = BlendOrder([5, 7, 11], [1, 1, 1], seed=4)
    for n in (0, 1, 7, 10, 1001):
        counts = order.counts(n)
        assert counts.sum() == n and np.abs(counts - n / 3).max() <= 2
        assert counts.tolist() == np.bincount(order.assign(np.arange(n))[0], minlength=3).tolist()


def test_micro_batches_read_a_blend_at_the_global_positions_and_resume(prepared_dir, small_dirs):
    from pretrain.data import micro_batches

    blend = BlendedReader.from_dirs([prepared_dir, small_dirs["json64"]], [0.6, 0.4], seed=3)
    world, micro = 2, 3
    got = [next(micro_batches(blend, r, world, micro, seed=3, consumed_samples=12)) for r in range(world)]
    assert [mb.sample_indices.tolist() for mb in got] == [[12, 13, 14], [15, 16, 17]]
    assert (got[1].input_ids == blend.batch([15, 16, 17])).all()


def test_incompatible_datasets_are_refused_with_every_problem(prepared_dir, small_dirs):
    with pytest.raises(UserError, match=r"weight -1 of .*json32 must be > 0; .*json32 has seq_len 32, .* has 64"):
        BlendedReader.from_dirs([prepared_dir, small_dirs["json32"]], [1, -1])
    with pytest.raises(UserError, match="1 datasets but 2 weights"):
        BlendedReader.from_dirs([prepared_dir], [1, 2])


SEQ_LEN = 2048
TOKENS = 10 * 10**12
SEQUENCES = [2_500_000_000, 900_000_000, 150_000_000]  # a manifest's train counts: no files
WEIGHTS = [0.6, 0.3, 0.1]  # the third dataset is read ~3.3 times in 10T tokens


def test_1024_ranks_over_a_10t_token_blend_read_disjoint_slices_in_the_weights_in_o_datasets_memory():
    world, micro = 1024, 4
    stride, total = world * micro, TOKENS // SEQ_LEN
    tracemalloc.start()
    order = BlendOrder(SEQUENCES, WEIGHTS, seed=17)
    assert order.counts(total).sum() == total
    rng = np.random.default_rng(0)
    for step in np.concatenate([[0, total // stride - 1], rng.integers(0, total // stride, 30)]):
        start = int(step) * stride
        positions = start + np.arange(world)[:, None] * micro + np.arange(micro)  # rank r's slice (pretrain.data)
        assert len(np.unique(positions)) == stride
        assert (np.sort(positions, axis=None) == start + np.arange(stride)).all()
        dataset, draw = order.assign(positions)
        for d in range(3):  # the step takes exactly each dataset's next draws: none repeated, none skipped
            want = np.arange(order.counts(start)[d], order.counts(start + stride)[d])
            assert (np.sort(draw[dataset == d]) == want).all()
        _, sequence = order.locate(positions)
        epoch = draw // np.array(SEQUENCES)[dataset]
        assert len(np.unique(np.stack([dataset, epoch, sequence]).reshape(3, -1), axis=1)[0]) == stride
        assert ((sequence >= 0) & (sequence < np.array(SEQUENCES)[dataset])).all()
        again = BlendOrder(SEQUENCES, WEIGHTS, seed=17).locate(positions[7])  # from the position alone
        assert (again[1] == sequence[7]).all()
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak_bytes < 2 * 2**20  # a (total,) int32 table alone would be 18 GiB; one step's arrays are ~100 KiB

    window = 10_000
    offsets = np.concatenate([rng.integers(0, total - window, 400), [0, total - window]])
    dataset, _ = order.assign(offsets[:, None] + np.arange(window))
    counts = np.stack([(dataset == d).sum(axis=1) for d in range(3)], axis=1)
    assert np.abs(counts / window - np.array(WEIGHTS)).max() <= 0.01
    assert np.abs(counts - window * np.array(WEIGHTS)).max() <= 3  # the documented bound: level l within l + 1
