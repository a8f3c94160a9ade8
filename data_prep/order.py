"""Seeded permutations of ``[0, N)`` computed per index (O(1) memory): the sample order of a prepared
dataset (:mod:`pretrain.data`) and of each dataset in a blend (:mod:`data_prep.blend`)."""
from __future__ import annotations

import numpy as np


class GlobalOrder:
    """Global stream position -> sample index: per epoch a seeded permutation of ``[0, N)``, O(1) memory.

    A keyed Feistel network over the smallest domain ``2**(2h) >= N`` with cycle walking to stay in
    ``[0, N)`` (Black and Rogaway, "Ciphers with arbitrary finite domains", 2002); a Feistel network
    is a bijection whatever its round function, and 6 rounds of a splitmix64 round function make
    it a pseudo-random permutation (Luby and Rackoff, 1988). Nothing is stored: at 10T tokens the
    materialised ``numpy`` permutation would be 36 GiB per rank (docs/scaling.md); this costs
    about 0.3 us per index. Round keys come from ``numpy.random.default_rng([seed, epoch])``.

    Args:
        num_samples: N, the size of the permuted domain (count, > 0).
        seed: keys the permutation.
        rounds: Feistel rounds.
        stream: None, or an int naming one of several independent permutations under the same
            seed (a blend's dataset index): the round keys then come from
            ``default_rng([seed, stream, epoch])``.

    Raises:
        ValueError: ``num_samples <= 0``.
    """

    def __init__(self, num_samples: int, seed: int, rounds: int = 6, stream: int | None = None):
        if num_samples <= 0:
            raise ValueError("the train split holds no sequence")
        self.num_samples, self.seed, self.rounds = num_samples, seed, rounds
        self._entropy = [seed] if stream is None else [seed, stream]
        half = (max(2, (num_samples - 1).bit_length()) + 1) // 2  # domain 2**(2*half): >= N, < 4N
        self._half, self._mask = np.uint64(half), np.uint64((1 << half) - 1)
        self._keys_cache: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.uint64))

    def _keys(self, epoch: int) -> np.ndarray:
        if self._keys_cache[0] != epoch:
            keys = np.random.default_rng([*self._entropy, epoch]).integers(0, 2**63, size=self.rounds, dtype=np.uint64)
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
