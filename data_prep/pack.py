"""Concat-and-chunk packing of tokenized documents into fixed-length sequences.

Each document becomes ``[bos] + ids + [eos]`` (``bos`` only when the tokenizer defines one that
differs from ``eos``) and is appended to a running buffer; every full ``seq_len`` window is one
packed sequence, with the positions where documents start recorded as document boundaries. This
is the GPT-2 / Megatron ``group_texts`` scheme, keeping boundaries so training can mask
cross-document attention.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class Packer:
    """Packs documents into ``(seq_len,)`` int64 sequences; counts tokens in, out and dropped."""

    def __init__(self, seq_len: int, eos_id: int, bos_id: int | None = None):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 tokens, got {seq_len}")
        self.seq_len = seq_len
        self.prefix = [bos_id] if bos_id is not None and bos_id != eos_id else []
        self.suffix = [eos_id]
        self._buf = np.empty(0, dtype=np.int64)
        self._starts: list[int] = []
        self.documents = 0
        self.tokens = 0
        """Tokens fed in, special tokens included."""
        self.sequences = 0
        self.tokens_dropped = 0
        """Tokens of the final partial sequence, dropped by :meth:`finish`."""

    def add(self, ids: Sequence[int]) -> Iterator[tuple[np.ndarray, list[int]]]:
        """Add one document's ids; yields every ``(sequence, document_starts)`` it completes."""
        doc = np.asarray(self.prefix + list(ids) + self.suffix, dtype=np.int64)
        self._starts.append(len(self._buf))
        self._buf = np.concatenate([self._buf, doc])
        self.documents += 1
        self.tokens += len(doc)
        n = self.seq_len
        while len(self._buf) >= n:
            seq, self._buf = self._buf[:n], self._buf[n:]
            starts = [s for s in self._starts if s < n]
            self._starts = [s - n for s in self._starts if s >= n]
            self.sequences += 1
            yield seq, starts

    def finish(self) -> None:
        """Drop the final partial sequence (fewer than ``seq_len`` tokens), counting its tokens."""
        self.tokens_dropped += len(self._buf)
        self._buf = np.empty(0, dtype=np.int64)
        self._starts = []
