"""The 1,024-rank claim, checked by index math with no processes: every data-parallel rank's slice of
the global sample order (``pretrain.data.micro_batches`` over the real prepared shards) is disjoint
from every other rank's, and together the slices cover a step range of the global order exactly,
each epoch of it a permutation of the train split. See docs/scaling.md."""
from __future__ import annotations

import math

import numpy as np

from data_prep.shards import ShardReader
from pretrain.data import GlobalOrder, micro_batches

WORLD_SIZE = 1024
MICRO_BATCH = 2
ACCUMULATION = 2
SEED = 5


def test_1024_ranks_read_disjoint_slices_that_cover_the_global_order(prepared_dir):
    reader = ShardReader(prepared_dir, "train")
    n = len(reader)
    samples_per_step = WORLD_SIZE * MICRO_BATCH * ACCUMULATION  # the global batch
    resumed_at_step = 3
    consumed = resumed_at_step * samples_per_step
    steps = math.ceil(2 * n / samples_per_step) + 1  # crosses at least two epoch boundaries
    micro_steps = steps * ACCUMULATION

    # sample indices read by (rank, micro step): (WORLD_SIZE, micro_steps, MICRO_BATCH)
    read = np.empty((WORLD_SIZE, micro_steps, MICRO_BATCH), dtype=np.int64)
    for rank in range(WORLD_SIZE):
        stream = micro_batches(reader, rank, WORLD_SIZE, MICRO_BATCH, SEED, consumed_samples=consumed)
        for k in range(micro_steps):
            mb = next(stream)
            read[rank, k] = mb.sample_indices
            if k == 0 and rank % 257 == 0:  # the rows are the samples named
                assert np.array_equal(mb.input_ids, reader.batch(mb.sample_indices))

    # Interleaved in global position order (micro step, then rank), the slices are exactly the
    # global stream from `consumed` on: no position skipped, none read twice.
    total = WORLD_SIZE * micro_steps * MICRO_BATCH
    in_position_order = read.transpose(1, 0, 2).reshape(-1)
    expected = GlobalOrder(n, SEED).indices(consumed, total)
    assert np.array_equal(in_position_order, expected)

    # Within every epoch each sample is read once, by one rank; a whole epoch covers the split.
    epochs = np.arange(consumed, consumed + total) // n
    full_epochs = 0
    for epoch in np.unique(epochs):
        samples = in_position_order[epochs == epoch]
        assert len(np.unique(samples)) == len(samples), f"epoch {epoch}: a sample is read twice"
        if len(samples) == n:
            full_epochs += 1
            assert np.array_equal(np.sort(samples), np.arange(n)), f"epoch {epoch} does not cover the split"
    assert full_epochs >= 1 and len(np.unique(epochs)) >= 3

    # Each rank's slice: the same number of samples, disjoint from the others' within an epoch.
    first_epoch = epochs.reshape(micro_steps, WORLD_SIZE, MICRO_BATCH).transpose(1, 0, 2) == epochs[0]
    slices = [set(read[r][first_epoch[r]].tolist()) for r in range(WORLD_SIZE)]
    assert sum(len(s) for s in slices) == len(set().union(*slices)) == int(first_epoch.sum())
