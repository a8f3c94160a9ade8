"""A deterministic weighted blend of several prepared datasets, read like one (Megatron-style).

Megatron-LM's ``BlendedDataset`` gives dataset ``d`` a share ``w_d`` of the ``N`` blended samples
and interleaves them so that every prefix of the blend holds each dataset in proportion to its
weight (``build_blending_indices``). Here dataset ``d`` gets ``n_d`` samples (``w_d * N`` rounded
by largest remainder, so they add up to ``N``), its ``j``-th sample placed at blend position
``(j + 0.5) / n_d`` (ties to the lower dataset index): the same proportional interleave.

The ``k``-th sample drawn from dataset ``d`` is sequence ``perm_{d,e}[k mod len_d]`` with
``e = k // len_d`` and ``perm_{d,e} = numpy.random.default_rng([seed, d, e]).permutation(len_d)``:
a dataset with a large weight is repeated in a fresh order each epoch, and the whole blend is a
pure function of the datasets, weights, ``num_samples`` and ``seed``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep.errors import UserError
from data_prep.shards import ShardReader


def blend_counts(weights: Sequence[float], num_samples: int) -> np.ndarray:
    """Samples per dataset: ``w_d / sum(w) * num_samples`` rounded by largest remainder (sums to ``num_samples``)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * num_samples
    counts = np.floor(exact).astype(np.int64)
    short = num_samples - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class BlendedReader:
    """``num_samples`` sequences drawn from ``readers`` by ``weights``; the interface of :class:`ShardReader`.

    Args:
        readers: readers of the same split of datasets prepared with the same tokenizer,
            ``seq_len`` and objective.
        weights: relative weights (> 0), normalised here.
        num_samples: sequences in the blend; default ``sum(len(r))``.
        seed: seeds the per-dataset epoch orders.

    Raises:
        UserError: weights and readers differ in number, a weight is not > 0, a dataset is empty,
            or the datasets disagree on tokenizer fingerprint, ``seq_len`` or objective (all listed).
    """

    def __init__(self, readers: Sequence[ShardReader], weights: Sequence[float], num_samples: int | None = None,
                 seed: int = 0):
        self.readers, self.seed = list(readers), seed
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._check(weights)
        first = self.readers[0]
        self.seq_len: int = first.seq_len
        self.num_samples = int(num_samples if num_samples is not None else sum(len(r) for r in self.readers))
        counts = blend_counts(weights, self.num_samples)
        dataset = np.concatenate([np.full(n, d, dtype=np.int32) for d, n in enumerate(counts)])
        position = np.concatenate([(np.arange(n) + 0.5) / n for n in counts if n])
        order = np.lexsort((dataset, position))
        self._dataset = dataset[order]
        self._draw = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])[order]
        self.manifest = {
            **{k: first.manifest[k] for k in ("format", "format_version", "seq_len", "token_dtype", "tokenizer") if k in first.manifest},
            "objective": first.manifest.get("objective", "clm"),
            "blend": [{"path": str(r.dir), "split": r.split, "weight": float(w) / float(sum(weights)),
                       "sequences": len(r), "samples": int(n)} for r, w, n in zip(self.readers, weights, counts)],
            "seed": seed,
        }

    @classmethod
    def from_dirs(cls, dirs: Sequence[str | Path], weights: Sequence[float], split: str = "train",
                  num_samples: int | None = None, seed: int = 0) -> "BlendedReader":
        """Open ``split`` of each prepared folder and blend them."""
        return cls([ShardReader(d, split) for d in dirs], weights, num_samples, seed)

    def _check(self, weights: Sequence[float]) -> None:
        problems = []
        if not self.readers or len(weights) != len(self.readers):
            problems.append(f"{len(self.readers)} datasets but {len(weights)} weights")
        problems += [f"weight {w} of {r.dir} must be > 0" for r, w in zip(self.readers, weights) if not w > 0]
        problems += [f"{r.dir} ({r.split}) holds no sequence" for r in self.readers if len(r) == 0]
        if self.readers:
            ref = self.readers[0]
            for r in self.readers[1:]:
                for what, get in (("seq_len", lambda x: x.seq_len), ("objective", lambda x: x.manifest.get("objective", "clm")),
                                  ("tokenizer fingerprint", lambda x: x.manifest["tokenizer"]["fingerprint"])):
                    if get(r) != get(ref):
                        problems.append(f"{r.dir} has {what} {get(r)}, {ref.dir} has {get(ref)}")
        if problems:
            raise UserError("blend: " + "; ".join(problems))

    def __len__(self) -> int:
        return self.num_samples

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perms:
            if len(self._perms) >= 2 * len(self.readers):
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, d, epoch]).permutation(len(self.readers[d]))
        return self._perms[key]

    def locate(self, index: int) -> tuple[int, int]:
        """``(dataset, sequence)`` that blend sample ``index`` reads."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range [0, {self.num_samples})")
        d, k = int(self._dataset[index]), int(self._draw[index])
        epoch, offset = divmod(k, len(self.readers[d]))
        return d, int(self._perm(d, epoch)[offset])

    def __getitem__(self, index: int) -> np.ndarray:
        """The ``(seq_len,)`` token ids of blend sample ``index``."""
        d, i = self.locate(index)
        return self.readers[d][i]

    def document_starts(self, index: int) -> list[int]:
        d, i = self.locate(index)
        return self.readers[d].document_starts(i)

    def num_tokens(self, index: int) -> int:
        d, i = self.locate(index)
        return self.readers[d].num_tokens(i)

    def batch(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """``(B, seq_len)`` int64 token ids."""
        return np.stack([self[int(i)] for i in indices]).astype(np.int64)

    def batch_num_tokens(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """``(B,)`` int64 real-token counts."""
        return np.array([self.num_tokens(int(i)) for i in indices], dtype=np.int64)

    def read_batch(self, indices: list[int] | np.ndarray) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
        """``(token ids (B, seq_len) int64, document starts per sequence, real-token counts (B,) int64)``."""
        parts = [self.readers[d].read_batch([i]) for d, i in (self.locate(int(k)) for k in indices)]
        if not parts:
            return np.empty((0, self.seq_len), dtype=np.int64), [], np.empty(0, dtype=np.int64)
        return (np.concatenate([p[0] for p in parts]), [p[1][0] for p in parts],
                np.concatenate([p[2] for p in parts]))
