"""Deterministic, resumable, disjoint streaming of packed sequences to data-parallel ranks.

One global sample order: epoch ``e`` visits the train split in a permutation keyed by
``(seed, e)`` (:class:`GlobalOrder`, computed per index, nothing stored). Global position ``k`` is sample
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
    """``(B,)`` indices of the sequences in their split; -1 marks a padding row of a validation batch."""
    document_starts: list[list[int]]
    """Per sequence, the positions where a document begins."""
    num_tokens: np.ndarray | None = None
    """``(B,)`` real tokens at the start of each sequence (the rest is padding); None: no padding."""


ORDER_NAME = "feistel-v1"
"""Recorded in checkpoints: a resume refuses a checkpoint trained with another sample order."""
ORDER_BLOCK_STEPS = 256
"""Micro steps whose sample indices :func:`micro_batches` computes in one vectorized call (the
permutation costs ~1 us per index in small calls, ~0.05 us in large ones)."""


class GlobalOrder:
    """Global stream position -> sample index: per epoch a seeded permutation of ``[0, N)``, O(1) memory.

    A keyed Feistel network over the smallest domain ``2**(2h) >= N`` with cycle walking to stay in
    ``[0, N)`` (Black and Rogaway, "Ciphers with arbitrary finite domains", 2002); a Feistel network
    is a bijection whatever its round function, and 6 rounds of a splitmix64 round function make
    it a pseudo-random permutation (Luby and Rackoff, 1988). Nothing is stored: at 10T tokens the
    materialised ``numpy`` permutation would be 36 GiB per rank (docs/scaling.md); this costs
    about 0.3 us per index. Round keys come from ``numpy.random.default_rng([seed, epoch])``.
    """

    def __init__(self, num_samples: int, seed: int, rounds: int = 6):
        if num_samples <= 0:
            raise ValueError("the train split holds no sequence")
        self.num_samples, self.seed, self.rounds = num_samples, seed, rounds
        half = (max(2, (num_samples - 1).bit_length()) + 1) // 2  # domain 2**(2*half): >= N, < 4N
        self._half, self._mask = np.uint64(half), np.uint64((1 << half) - 1)
        self._keys_cache: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.uint64))

    def _keys(self, epoch: int) -> np.ndarray:
        if self._keys_cache[0] != epoch:
            keys = np.random.default_rng([self.seed, epoch]).integers(0, 2**63, size=self.rounds, dtype=np.uint64)
            self._keys_cache = (epoch, keys)
        return self._keys_cache[1]

    def _round(self, r: np.ndarray, key: np.uint64) -> np.ndarray:
        x = r ^ key  # splitmix64 finaliser (Steele et al. 2014)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & self._mask

    def _encrypt(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self._half) | right

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global positions ``start .. start + count - 1``, ``(count,)`` int64."""
        return self.at(np.arange(start, start + count, dtype=np.uint64))

    def at(self, positions: np.ndarray) -> np.ndarray:
        """Sample indices at the global ``positions`` (any shape of non-negative ints), same shape, int64."""
        n = np.uint64(self.num_samples)
        pos = np.asarray(positions, dtype=np.uint64)
        epochs, offsets = pos // n, pos % n
        out = np.empty(pos.shape, dtype=np.int64)
        with np.errstate(over="ignore"):  # the round function multiplies modulo 2**64 on purpose
            for epoch in np.unique(epochs):
                sel = epochs == epoch
                keys = self._keys(int(epoch))
                y = self._encrypt(offsets[sel], keys)
                while (bad := y >= n).any():  # cycle walking
                    y[bad] = self._encrypt(y[bad], keys)
                out[sel] = y.astype(np.int64)
        return out


def micro_batches(reader: ShardReader, rank: int, world_size: int, micro_batch_size: int,
                  seed: int, consumed_samples: int = 0) -> Iterator[MicroBatch]:
    """Endless micro batches for ``rank``, starting after ``consumed_samples`` global samples."""
    order = GlobalOrder(len(reader), seed)
    stride = world_size * micro_batch_size
    steps = np.arange(ORDER_BLOCK_STEPS, dtype=np.uint64)[:, None] * np.uint64(stride)
    first = consumed_samples + rank * micro_batch_size
    while True:  # this rank's positions for ORDER_BLOCK_STEPS micro steps at once: one vectorized order call
        block = order.at(np.uint64(first) + steps + np.arange(micro_batch_size, dtype=np.uint64))
        for idx in block:
            yield MicroBatch(*_read(reader, idx))
        first += ORDER_BLOCK_STEPS * stride


def _read(reader, idx: np.ndarray) -> tuple:
    """``MicroBatch`` fields for the sample indices ``idx``."""
    ids, starts, nums = reader.read_batch(idx)
    return ids, idx, starts, nums


def eval_indices(num_sequences: int, rank: int, world_size: int, micro_batch_size: int,
                 max_batches: int) -> Iterator[np.ndarray]:
    """Per validation micro batch of ``rank``: ``(micro_batch_size,)`` int64 positions in the split, in
    order, ``-1`` for a padding row.

    Every rank gets the same number of batches of the same shape (ZeRO-3 forwards are collective), at
    most ``max_batches``, covering the split's first ``max_batches * world_size * micro_batch_size``
    sequences. When the split ends inside a batch, that batch is filled up with padding rows, so a
    split smaller than one micro batch per rank is evaluated too (ranks past its end evaluate padding
    only); an empty split gives no batch.
    """
    per_step = world_size * micro_batch_size
    for b in range(min(max_batches, -(-num_sequences // per_step))):
        idx = np.arange(b * per_step + rank * micro_batch_size, b * per_step + (rank + 1) * micro_batch_size)
        yield np.where(idx < num_sequences, idx, -1)


def padded(idx: np.ndarray, ids: np.ndarray, starts: list[list[int]], nums: np.ndarray | None) -> MicroBatch:
    """A validation MicroBatch whose rows with ``idx == -1`` are padding: ``num_tokens`` 0, so they carry no
    label and no attention (pretrain.inputs) and add nothing to the validation loss. ``ids`` of those rows
    are any real sequence's (a forward of them is well defined)."""
    real = idx >= 0
    if real.all():
        return MicroBatch(ids, idx, starts, nums)
    nums = np.full(len(idx), ids.shape[1], dtype=np.int64) if nums is None else np.asarray(nums, dtype=np.int64)
    return MicroBatch(ids, idx, starts, np.where(real, nums, 0))


def eval_batches(reader: ShardReader, rank: int, world_size: int, micro_batch_size: int,
                 max_batches: int) -> Iterator[MicroBatch]:
    """The fixed validation set: micro batches of the split's first sequences, in order (see
    :func:`eval_indices`; a last partial batch is padded with masked rows, see :func:`padded`)."""
    for idx in eval_indices(len(reader), rank, world_size, micro_batch_size, max_batches):
        ids, starts, nums = reader.read_batch(np.where(idx >= 0, idx, 0))
        yield padded(idx, ids, starts, nums)
