"""Deterministic, resumable, disjoint streaming of packed sequences to data-parallel ranks.

One global sample order: epoch ``e`` visits the train split in the permutation drawn by
``numpy.random.default_rng([seed, e])``. Global stream position ``k`` is sample
``perm_{k // N}[k % N]``. Each micro step consumes ``world_size * micro_batch_size`` consecutive
positions; rank ``r`` takes the ``r``-th block of ``micro_batch_size``. Ranks therefore read
disjoint samples, and ``consumed_samples`` alone says where to resume (as Megatron's
``MegatronPretrainingSampler`` does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from data_prep.shards import ShardReader


@dataclass(frozen=True)
class MicroBatch:
    input_ids: np.ndarray
    """``(B, T)`` int64 token ids."""
    sample_indices: np.ndarray
    """``(B,)`` indices of the sequences in their split."""
    document_starts: list[list[int]]
    """Per sequence, the positions where a document begins."""


class GlobalOrder:
    """Maps a global stream position to a sample index; one seeded permutation per epoch."""

    def __init__(self, num_samples: int, seed: int):
        if num_samples <= 0:
            raise ValueError("the train split holds no sequence")
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global positions ``start .. start + count - 1``."""
        out = np.empty(count, dtype=np.int64)
        for i, pos in enumerate(range(start, start + count)):
            epoch, offset = divmod(pos, self.num_samples)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            out[i] = self._perm[offset]
        return out


def micro_batches(reader: ShardReader, rank: int, world_size: int, micro_batch_size: int,
                  seed: int, consumed_samples: int = 0) -> Iterator[MicroBatch]:
    """Endless micro batches for ``rank``, starting after ``consumed_samples`` global samples."""
    order = GlobalOrder(len(reader), seed)
    position = consumed_samples
    while True:
        idx = order.indices(position + rank * micro_batch_size, micro_batch_size)
        yield MicroBatch(reader.batch(idx), idx, [reader.document_starts(int(i)) for i in idx])
        position += world_size * micro_batch_size


def eval_batches(reader: ShardReader, rank: int, world_size: int, micro_batch_size: int,
                 max_batches: int) -> Iterator[MicroBatch]:
    """The fixed validation set: micro batches of the split's first sequences, in order.

    Every rank gets the same number of batches (ZeRO-3 forwards are collective), at most
    ``max_batches``; sequences past ``world_size * micro_batch_size * n`` are not evaluated.
    """
    per_step = world_size * micro_batch_size
    n = min(max_batches, len(reader) // per_step)
    for b in range(n):
        idx = np.arange(b * per_step + rank * micro_batch_size, b * per_step + (rank + 1) * micro_batch_size)
        yield MicroBatch(reader.batch(idx), idx, [reader.document_starts(int(i)) for i in idx])
