"""A deterministic weighted blend of several prepared datasets, read like one endless stream.

Like Megatron-LM's ``BlendedDataset`` (``build_blending_indices``), every stretch of the blend holds
each dataset in proportion to its weight, but each blend position is computed on its own (nothing
is stored, O(number of datasets) memory), so 10T-token runs resume from ``consumed_samples`` alone.

**Which dataset** (:class:`BlendOrder`): datasets are split off one at a time. Level ``l`` takes
from the stream left by the levels before it the share ``p_l = w_l / (w_l + ... + w_{D-1})``, by
the Beatty sequence ``f_l(x) = floor(x * p_l + phi_l)`` (phase ``phi_l`` in ``[0, 1)`` seeded):
position ``x`` of that stream goes to dataset ``l`` iff ``f_l(x + 1) > f_l(x)``, as its ``f_l(x)``-th
draw, else it is position ``x - f_l(x)`` of the stream passed on; the last dataset takes what is
left. Any window of ``L`` consecutive positions gives dataset ``l`` within ``l + 1`` samples of
``w_l * L`` (each level's counts are within one of exact, and a window stays a window at the next
level). ``p_l`` is held as an integer over ``2**31`` and ``f_l`` computed in exact uint64 integer
arithmetic, for any position below ``2**63``.

**Which sequence**: the ``k``-th draw of dataset ``d`` (length ``n_d``) is
``GlobalOrder(n_d, seed, stream=d).at(k)`` (:mod:`data_prep.order`): a seeded Feistel permutation
per pass, a fresh one each time a dataset with a large weight wraps around (epoch ``k // n_d``).
The blend is a pure function of the dataset lengths, weights and ``seed``; the trainer reads it at
its global positions (no second shuffle, :func:`pretrain.data.micro_batches`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep.encode import TRAIN
from data_prep.errors import UserError
from data_prep.mixture import BLEND_ORDER_NAME, BlendOrder, MixtureOrder
from data_prep.shards import ShardReader

__all__ = ["BLEND_ORDER_NAME", "BlendOrder", "BlendedReader", "MixtureOrder"]

class BlendedReader:
    """Sequences drawn from ``readers`` by ``weights`` (:class:`BlendOrder`), optionally under per-source
    repetition caps and a weight schedule (:class:`data_prep.mixture.MixtureOrder`); the interface of
    :class:`ShardReader`.

    The blend is endless (any index >= 0 reads; datasets wrap in fresh orders) and already shuffled
    (``ordered``): the trainer reads blend index ``k`` at global position ``k``. ``len()`` is
    ``num_samples``, one nominal pass (capped sources counted up to their cap), whose per-dataset counts
    the manifest lists.

    Args:
        readers: readers of the same split of datasets prepared with the same tokenizer,
            ``seq_len`` and objective.
        weights: relative weights (> 0), normalised here.
        num_samples: sequences in one nominal pass; default ``sum(len(r))``.
        seed: seeds the blend (:class:`BlendOrder`).
        max_epochs: per reader, the most passes over it (0 = no cap); None: no caps.
        schedule: ``[(start sample, weights)]`` of later phases; one starting at 0 replaces ``weights``.

    Raises:
        UserError: weights and readers differ in number, a weight is not > 0, a dataset is empty,
            or the datasets disagree on tokenizer fingerprint, ``seq_len`` or objective (all listed).
    """

    ordered = True
    """Indices are already the training order: read position ``k`` as index ``k``."""

    def __init__(self, readers: Sequence[ShardReader], weights: Sequence[float], num_samples: int | None = None,
                 seed: int = 0, max_epochs: Sequence[float] | None = None,
                 schedule: Sequence[tuple[int, Sequence[float]]] = ()):
        self.readers, self.seed = list(readers), seed
        self._check(weights)
        first = self.readers[0]
        self.seq_len: int = first.seq_len
        phases = list(schedule) if schedule and schedule[0][0] == 0 else [(0, weights), *schedule]
        caps = [float(c) for c in max_epochs] if max_epochs is not None else [0.0] * len(self.readers)
        self.order = MixtureOrder([len(r) for r in self.readers], phases, caps, seed)
        pass_size = sum(len(r) if m is None else min(len(r), m) for r, m in zip(self.readers, self.order.max_draws))
        self.num_samples = int(num_samples if num_samples is not None else pass_size)
        counts = self.order.counts(self.num_samples)
        w = np.asarray(phases[0][1], dtype=np.float64)
        self.manifest = {
            **{k: first.manifest[k] for k in ("format", "format_version", "seq_len", "token_dtype", "tokenizer") if k in first.manifest},
            "objective": first.manifest.get("objective", "clm"),
            "blend": [{"path": str(r.dir), "split": r.split, "weight": float(x), "sequences": len(r), "samples": int(n),
                       **({"max_epochs": c} if c else {})}
                      for r, x, n, c in zip(self.readers, w / w.sum(), counts, caps)],
            "blend_order": BLEND_ORDER_NAME,
            "seed": seed,
        }
        if len(phases) > 1:
            self.manifest["blend_schedule"] = [{"start_sample": s, "weights": list(ws)} for s, ws in self.order.phases]

    def mixture(self, num_samples: int) -> list[dict]:
        """Per source over blend samples ``[0, num_samples)``: ``path``, ``samples`` (sequences read),
        ``tokens`` (``samples * seq_len`` token positions), ``epochs`` (``samples / sequences``) and
        ``share`` (``samples / num_samples``, the effective weight after caps and schedule).

        Raises:
            UserError: ``num_samples`` reaches past the point where every source reached its cap.
        """
        counts = self.order.counts(num_samples)
        return [{"path": str(r.dir), "samples": int(n), "tokens": int(n) * self.seq_len, "epochs": int(n) / len(r),
                 "share": int(n) / max(1, num_samples)} for r, n in zip(self.readers, counts)]

    @classmethod
    def from_dirs(cls, dirs: Sequence[str | Path], weights: Sequence[float], split: str = TRAIN,
                  num_samples: int | None = None, seed: int = 0, max_epochs: Sequence[float] | None = None,
                  schedule: Sequence[tuple[int, Sequence[float]]] = ()) -> BlendedReader:
        """Open ``split`` of each prepared folder and blend them (caps and schedule: :class:`MixtureOrder`)."""
        return cls([ShardReader(d, split) for d in dirs], weights, num_samples, seed, max_epochs, schedule)

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

    def locate(self, index: int) -> tuple[int, int]:
        """``(dataset, sequence)`` that blend sample ``index`` (>= 0) reads.

        Raises:
            IndexError: ``index < 0``.
        """
        if index < 0:
            raise IndexError(f"blend sample {index} is negative")
        d, i = self.order.locate(np.array([index]))
        return int(d[0]), int(i[0])

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
        return self.read_batch(indices)[0]

    def batch_num_tokens(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """``(B,)`` int64 real-token counts."""
        return self.read_batch(indices)[2]

    def read_batch(self, indices: list[int] | np.ndarray) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
        """``(token ids (B, seq_len) int64, document starts per sequence, real-token counts (B,) int64)``;
        one vectorized locate, one read per dataset.

        Raises:
            IndexError: a negative index.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and idx.min() < 0:
            raise IndexError(f"blend samples {idx.tolist()} include a negative index")
        dataset, sequence = self.order.locate(idx)
        ids = np.empty((len(idx), self.seq_len), dtype=np.int64)
        starts: list[list[int]] = [[] for _ in range(len(idx))]
        nums = np.empty(len(idx), dtype=np.int64)
        for d in np.unique(dataset):
            where = np.flatnonzero(dataset == d)
            part_ids, part_starts, part_nums = self.readers[int(d)].read_batch(sequence[where])
            ids[where], nums[where] = part_ids, part_nums
            for k, s in zip(where.tolist(), part_starts):
                starts[k] = s
        return ids, starts, nums
