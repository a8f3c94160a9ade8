"""The blend order (:class:`BlendOrder`, described in :mod:`data_prep.blend`), and a blend whose weights
change at given positions (a schedule) and whose sources stop at a repetition cap (:class:`MixtureOrder`).

OLMo-core's source mixtures cap how often a small source repeats; curricula and annealing phases change
the weights during a run. Both are a list of *segments* of the blend stream, each an ordinary
:class:`data_prep.blend.BlendOrder` over the sources active in it, computed at construction from the
dataset lengths, phases, caps and seed only (at most ``phases + datasets`` segments, each found by a
binary search on exact counts). Nothing depends on the planned run length, so a blend position is
still a pure function of its index, and a run resumes from ``consumed_samples`` alone.

- **Phases**: ``phases[p] = (start, weights)``; phase ``p`` covers blend positions
  ``[start_p, start_{p+1})``. The trainer turns ``data.blend_schedule`` steps into positions as
  ``step * global_batch``. A weight of 0 switches a source off for that phase.
- **Caps** (``max_epochs[d]``, 0 = none): source ``d`` is drawn at most ``floor(max_epochs[d] * n_d)``
  times. Where its last allowed draw falls, a segment ends and the next one blends the remaining
  active sources with their phase weights renormalised: the exhausted source's share goes to the
  others in proportion to their weights. When every source of a phase is exhausted, reading further
  raises :class:`UserError`.
- **Which sequence**: source ``d``'s ``k``-th draw over the whole run (draws of earlier segments
  counted) reads ``GlobalOrder(n_d, seed, stream=d).at(k)``, so a source continues its permutation
  across segments rather than restarting it. With one phase and no cap this is exactly
  :class:`BlendOrder` (the same positions read the same sequences).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, overload

import numpy as np

from data_prep.errors import UserError
from data_prep.order import GlobalOrder

BLEND_ORDER_NAME = "beatty-feistel-v1"
"""Recorded in a blend's manifest: the order in this module's docstring."""
SHARE_BITS = 31
"""Each level's share is an integer over ``2**SHARE_BITS`` (resolution 4.7e-10)."""
_PHASE_KEY = 0xB1E4D
"""Mixed into the seed of the levels' phases so that they differ from the datasets' permutation keys."""


class _PerSourceOrder:
    """What both blend orders share: each source's own sample order (``_perms``, one Feistel permutation a
    source), and reading the sequences that :meth:`assign`'s draws name."""

    _perms: list[GlobalOrder]

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset, sequence)`` that blend ``positions`` read: both int64, the shape of ``positions``."""
        dataset, draw = self.assign(positions)
        sequence = np.empty_like(draw)
        for d in np.unique(dataset):
            sel = dataset == d
            sequence[sel] = self._perms[int(d)].at(draw[sel])
        return dataset, sequence


class BlendOrder(_PerSourceOrder):
    """Blend position -> ``(dataset, sequence)`` from dataset lengths and weights only; O(datasets) memory.

    Args:
        lengths: sequences per dataset (counts, each > 0), e.g. a manifest's split counts.
        weights: relative weights (each > 0), normalised here.
        seed: seeds the interleave's phases and the datasets' permutations.

    Raises:
        UserError: lengths and weights differ in number, or a length or weight is not > 0.
    """

    def __init__(self, lengths: Sequence[int], weights: Sequence[float], seed: int = 0):
        if not lengths or len(lengths) != len(weights):
            raise UserError(f"blend: {len(lengths)} datasets but {len(weights)} weights")
        bad = [f"dataset {d}: length {n}, weight {w}" for d, (n, w) in enumerate(zip(lengths, weights))
               if not (n > 0 and w > 0)]
        if bad:
            raise UserError(f"blend: lengths and weights must be > 0 ({'; '.join(bad)})")
        self.lengths = [int(n) for n in lengths]
        w = np.asarray(weights, dtype=np.float64)
        rest = np.cumsum(w[::-1])[::-1]  # w_l + ... + w_{D-1}
        scale = 1 << SHARE_BITS
        self._share = np.clip(np.rint(w[:-1] / rest[:-1] * scale), 1, scale - 1).astype(np.uint64)
        self._phase = np.random.default_rng([seed, _PHASE_KEY]).integers(0, scale, size=len(w) - 1, dtype=np.uint64)
        self._perms = [GlobalOrder(n, seed, stream=d) for d, n in enumerate(self.lengths)]
        self.weights = w / w.sum()

    @overload
    def _taken(self, level: int, x: np.ndarray) -> np.ndarray: ...
    @overload
    def _taken(self, level: int, x: np.uint64) -> np.uint64: ...

    def _taken(self, level: int, x: np.ndarray | np.uint64) -> np.ndarray | np.uint64:
        """``f_level(x)``: positions of ``[0, x)`` of the level's stream that go to dataset ``level`` (uint64)."""
        p, bits = self._share[level], np.uint64(SHARE_BITS)
        low = x & np.uint64((1 << SHARE_BITS) - 1)
        return (x >> bits) * p + ((low * p + self._phase[level]) >> bits)

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset, draw)`` of blend ``positions`` (any shape, ints in ``[0, 2**63)``): both int64, same shape;
        ``draw`` counts the earlier positions that went to the same dataset."""
        x = np.asarray(positions, dtype=np.uint64).reshape(-1)
        dataset = np.full(x.shape, len(self.lengths) - 1, dtype=np.int64)
        draw = np.empty(x.shape, dtype=np.int64)
        open_ = np.arange(x.size)  # positions not yet assigned, and their index in the current level's stream
        for level in range(len(self.lengths) - 1):
            before = self._taken(level, x)
            hit = self._taken(level, x + np.uint64(1)) > before
            dataset[open_[hit]], draw[open_[hit]] = level, before[hit].astype(np.int64)
            open_, x = open_[~hit], (x - before)[~hit]
        draw[open_] = x.astype(np.int64)
        shape = np.shape(positions)
        return dataset.reshape(shape), draw.reshape(shape)

    def counts(self, num_samples: int) -> np.ndarray:
        """``(D,)`` int64: how many of blend positions ``[0, num_samples)`` go to each dataset (they sum to
        ``num_samples``)."""
        out: list[int] = []
        left = np.uint64(num_samples)
        for level in range(len(self.lengths) - 1):
            taken = self._taken(level, left)
            out.append(int(taken))
            left = left - taken
        return np.array(out + [int(left)], dtype=np.int64)


MAX_POSITION = 1 << 62
"""Positions searched for a cap's exhaustion point (a blend never gets that far)."""


@dataclass(frozen=True)
class Segment:
    """A stretch ``[start, end)`` of blend positions read by one :class:`BlendOrder` over ``datasets``."""

    start: int
    end: int
    """Exclusive; ``MAX_POSITION`` for the endless last one."""
    datasets: tuple[int, ...]
    """Indices of the sources active here (empty: all exhausted)."""
    order: BlendOrder | None
    offsets: np.ndarray
    """``(D,)`` int64 draws of each source before this segment."""


class MixtureOrder(_PerSourceOrder):
    """Blend position -> ``(dataset, sequence)`` under a weight schedule and repetition caps.

    Args:
        lengths: sequences per source (counts, > 0).
        phases: ``[(start position, weights)]``, starts strictly increasing from 0, each weight list
            one per source, >= 0 with at least one > 0.
        max_epochs: per source, the most passes over it (a float, 0 = no cap); default no caps.
        seed: seeds the interleaves and the sources' permutations (as :class:`BlendOrder`).

    Raises:
        UserError: a phase's weights differ in number from the sources or are all 0, starts are not
            increasing from 0, a cap is negative, or a length is not > 0.
    """

    def __init__(self, lengths: Sequence[int], phases: Sequence[tuple[int, Sequence[float]]],
                 max_epochs: Sequence[float] | None = None, seed: int = 0):
        self.lengths = [int(n) for n in lengths]
        caps = list(max_epochs) if max_epochs is not None else [0.0] * len(lengths)
        _check(self.lengths, phases, caps)
        self.phases = [(int(s), [float(w) for w in ws]) for s, ws in phases]
        self.max_draws = [int(c * n) if c > 0 else None for c, n in zip(caps, self.lengths)]
        self.seed = seed
        self._perms = [GlobalOrder(n, seed, stream=d) for d, n in enumerate(self.lengths)]
        self.segments = self._segments()
        self._starts = np.array([s.start for s in self.segments], dtype=np.int64)

    def _segments(self) -> list[Segment]:
        drawn = np.zeros(len(self.lengths), dtype=np.int64)
        out: list[Segment] = []
        ends = [s for s, _ in self.phases[1:]] + [MAX_POSITION]
        for (start, weights), phase_end in zip(self.phases, ends):
            while start < phase_end:
                active = tuple(d for d, w in enumerate(weights) if w > 0
                               and (self.max_draws[d] is None or drawn[d] < self.max_draws[d]))
                if not active:
                    out.append(Segment(start, phase_end, (), None, drawn.copy()))
                    break
                order = BlendOrder([self.lengths[d] for d in active], [weights[d] for d in active], self.seed)
                end = min([phase_end] + [start + _first_reaching(order, k, self.max_draws[d] - drawn[d])
                                         for k, d in enumerate(active) if self.max_draws[d] is not None])
                out.append(Segment(start, end, active, order, drawn.copy()))
                if end < MAX_POSITION:
                    drawn[list(active)] += order.counts(end - start)
                start = end
        return out

    def assign(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset, draw)`` of blend ``positions`` (ints in ``[0, 2**62)``, any shape), both int64 of that
        shape; ``draw`` counts the source's earlier draws over the whole blend.

        Raises:
            UserError: a position lies where every source of its phase reached its ``max_epochs``.
        """
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        which = np.searchsorted(self._starts, pos, side="right") - 1
        dataset, draw = np.empty_like(pos), np.empty_like(pos)
        for s in np.unique(which):
            seg, sel = self.segments[int(s)], which == s
            if seg.order is None:
                raise UserError(f"blend: sample {int(pos[sel][0])} lies past the point ({seg.start}) where every source of its "
                                f"phase reached its max_epochs {self.max_draws} draws; raise data.blend[i].max_epochs")
            local_d, local_k = seg.order.assign(pos[sel] - seg.start)
            ids = np.asarray(seg.datasets, dtype=np.int64)[local_d]
            dataset[sel], draw[sel] = ids, local_k + seg.offsets[ids]
        shape = np.shape(positions)
        return dataset.reshape(shape), draw.reshape(shape)

    def counts(self, num_samples: int) -> np.ndarray:
        """``(D,)`` int64: draws of each source among blend positions ``[0, num_samples)``.

        Raises:
            UserError: ``num_samples`` reaches past the point where every source is exhausted.
        """
        out = np.zeros(len(self.lengths), dtype=np.int64)
        for seg in self.segments:
            if seg.start >= num_samples:
                break
            if seg.order is None:
                self.assign(np.array([seg.start]))  # raises
                break
            out[list(seg.datasets)] += seg.order.counts(min(seg.end, num_samples) - seg.start)
        return out

    def epochs(self, num_samples: int) -> np.ndarray:
        """``(D,)`` float64 passes over each source in ``[0, num_samples)``: ``counts / lengths``."""
        return self.counts(num_samples) / np.asarray(self.lengths, dtype=np.float64)


def _first_reaching(order: BlendOrder, k: int, target: int) -> int:
    """The smallest ``x`` with ``order.counts(x)[k] >= target`` (``MAX_POSITION`` if none below it): the end
    of the stretch holding source ``k``'s first ``target`` draws. Binary search; counts are monotone in ``x``."""
    if target <= 0:
        return 0
    lo, hi = 0, MAX_POSITION
    if order.counts(hi)[k] < target:
        return MAX_POSITION
    while lo < hi:
        mid = (lo + hi) // 2
        if order.counts(mid)[k] >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _check(lengths: list[int], phases: Sequence[tuple[int, Sequence[float]]], caps: list[float]) -> None:
    problems = [f"dataset {d}: length {n}" for d, n in enumerate(lengths) if n <= 0]
    problems += [f"dataset {d}: max_epochs {c} (allowed: >= 0, 0 = no cap)" for d, c in enumerate(caps) if c < 0]
    if len(caps) != len(lengths):
        problems.append(f"{len(lengths)} datasets but {len(caps)} max_epochs")
    starts = [int(s) for s, _ in phases]
    if not phases or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
        problems.append(f"phase starts {starts} must begin at 0 and increase")
    for p, (start, ws) in enumerate(phases):
        if len(ws) != len(lengths) or any(not w >= 0 for w in ws) or not any(w > 0 for w in ws):
            problems.append(f"phase {p} (from sample {start}): weights {list(ws)} need {len(lengths)} values >= 0, one > 0")
    if problems:
        raise UserError("blend: " + "; ".join(problems))
