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

from data_prep.order import GlobalOrder
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


def micro_batches(reader: ShardReader, rank: int, world_size: int, micro_batch_size: int,
                  seed: int, consumed_samples: int = 0) -> Iterator[MicroBatch]:
    """Endless micro batches for ``rank``, starting after ``consumed_samples`` global samples.

    A reader whose indices already form an endless shuffled stream (``reader.ordered``: a blend,
    :class:`data_prep.blend.BlendedReader`) is read at the global positions themselves.
    """
    order = None if getattr(reader, "ordered", False) else GlobalOrder(len(reader), seed)
    stride = world_size * micro_batch_size
    steps = np.arange(ORDER_BLOCK_STEPS, dtype=np.uint64)[:, None] * np.uint64(stride)
    first = consumed_samples + rank * micro_batch_size
    while True:  # this rank's positions for ORDER_BLOCK_STEPS micro steps at once: one vectorized order call
        positions = np.uint64(first) + steps + np.arange(micro_batch_size, dtype=np.uint64)
        block = positions.astype(np.int64) if order is None else order.at(positions)
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
