import numpy as np

from data_prep.shards import ShardReader
from pretrain.data import GlobalOrder, eval_batches, micro_batches


def _take(gen, n):
    return [next(gen) for _ in range(n)]


def test_ranks_read_disjoint_samples_that_cover_the_global_order(prepared_dir):
    reader = ShardReader(prepared_dir, "train")
    world, micro, steps = 2, 4, 10
    per_rank = [np.concatenate([mb.sample_indices for mb in _take(micro_batches(reader, r, world, micro, seed=7), steps)])
                for r in range(world)]
    assert not set(per_rank[0]) & set(per_rank[1])
    together = np.sort(np.concatenate(per_rank))
    assert together.tolist() == sorted(GlobalOrder(len(reader), 7).indices(0, world * micro * steps).tolist())
    mb = next(micro_batches(reader, 0, world, micro, seed=7))
    assert mb.input_ids.shape == (micro, 64) and mb.input_ids.dtype == np.int64
    assert (mb.input_ids[0] == reader[int(mb.sample_indices[0])]).all()


def test_resume_from_consumed_samples_continues_the_same_stream(prepared_dir):
    reader = ShardReader(prepared_dir, "train")
    full = _take(micro_batches(reader, 1, 2, 4, seed=3), 6)
    resumed = _take(micro_batches(reader, 1, 2, 4, seed=3, consumed_samples=3 * 2 * 4), 3)
    assert [m.sample_indices.tolist() for m in full[3:]] == [m.sample_indices.tolist() for m in resumed]


def test_blocks_of_precomputed_indices_follow_the_per_step_formula_across_epochs(prepared_dir):
    """micro_batches computes ORDER_BLOCK_STEPS steps of indices at once; step s must still read
    positions consumed + s * W * B + r * B ... + B - 1, also past a block and an epoch boundary."""
    from pretrain.data import ORDER_BLOCK_STEPS

    reader = ShardReader(prepared_dir, "train")
    world, micro, steps = 2, 3, ORDER_BLOCK_STEPS + 3
    consumed = len(reader) - 100 * world * micro - 1  # the first epoch ends inside the first block
    order = GlobalOrder(len(reader), 11)
    got = _take(micro_batches(reader, 1, world, micro, seed=11, consumed_samples=consumed), steps)
    for s in (0, ORDER_BLOCK_STEPS - 1, ORDER_BLOCK_STEPS, steps - 1):
        want = order.indices(consumed + s * world * micro + micro, micro)
        assert got[s].sample_indices.tolist() == want.tolist()
        ids, starts, nums = reader.read_batch(want)
        assert (got[s].input_ids == ids).all() and got[s].document_starts == starts
        assert [reader.document_starts(int(i)) for i in want] == starts
        assert nums.tolist() == [reader.num_tokens(int(i)) for i in want]


def test_order_is_a_permutation_per_epoch_and_depends_on_seed():
    order = GlobalOrder(10, seed=1)
    first, second = order.indices(0, 10), order.indices(10, 10)
    assert sorted(first) == list(range(10)) == sorted(second)
    assert first.tolist() != second.tolist()
    assert first.tolist() != GlobalOrder(10, seed=2).indices(0, 10).tolist()


def test_eval_batches_are_equal_per_rank_and_disjoint(prepared_dir):
    reader = ShardReader(prepared_dir, "val")
    got = [list(eval_batches(reader, r, 2, 2, max_batches=3)) for r in range(2)]
    assert len(got[0]) == len(got[1]) > 0
    assert not np.array_equal(got[0][0].input_ids, got[1][0].input_ids)
    assert not set(got[0][0].sample_indices) & set(got[1][0].sample_indices)


def test_feistel_order_is_a_permutation_for_awkward_sizes_and_cheap_at_10t_tokens():
    for n in (1, 2, 3, 10, 1000, 12345, 65536, 100003):
        order = GlobalOrder(n, seed=5)
        for epoch in range(2):
            assert sorted(order.indices(epoch * n, n).tolist()) == list(range(n)), n
    big = GlobalOrder(4_882_812_500, seed=1)  # 10T tokens of 2,048-token sequences
    idx = big.indices(3 * 4_882_812_500 - 5, 10)  # across an epoch boundary, nothing materialised
    assert ((idx >= 0) & (idx < 4_882_812_500)).all() and len(set(idx.tolist())) == 10
