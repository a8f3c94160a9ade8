"""Concat-and-chunk packing of tokenized documents into fixed-length sequences, vectorised.

The token *stream* of a split is every document's ids with its per-document special tokens (for
causal LM: ``[bos] + ids + [eos]``, ``bos`` only when the tokenizer defines one that differs from
``eos``; for MLM: ``ids + [sep]``, the extra separator between documents of RoBERTa's
FULL-SENTENCES packing, Liu et al. 2019, sec. 4.2). The stream is cut into rows of ``row_tokens``;
each row is *framed* by the sequence-level special tokens (none for causal LM; the tokenizer's
post-processor template for MLM, e.g. ``[CLS] row [SEP]``) into a ``seq_len`` sequence. This is
the GPT-2 / Megatron ``group_texts`` scheme, keeping document boundaries so training can mask
cross-document attention.

Document boundaries (``document_starts``) are the positions in a sequence where a document, or a
fragment of one that does not continue the preceding token, begins. The last partial row is the
*tail*: prep keeps it per task, and the merge packs all tails together and then drops or pads
what is left (``tail='drop'|'pad'``); padded positions are recorded by the per-sequence count of
real tokens (``num_tokens``), so training can mask them out of the loss.

:class:`StreamPacker` cuts whole blocks of documents at once (numpy, used by prep);
:class:`Packer` takes one document at a time (for streaming callers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

TAIL_MODES = ("drop", "pad")


@dataclass
class Rows:
    """Framed sequences ready for a shard.

    ``ids`` is ``(n, seq_len)``; ``starts`` holds the document starts of all rows, row ``i``'s
    being ``starts[offsets[i]:offsets[i + 1]]`` (``offsets`` is ``(n + 1,)``, int32);
    ``num_tokens`` is ``(n,)`` int32, the real (non-padding) tokens of each row.
    """

    ids: np.ndarray
    offsets: np.ndarray
    starts: np.ndarray
    num_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, a: int, b: int) -> Rows:
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        return Rows(self.ids[a:b], self.offsets[a:b + 1] - lo, self.starts[lo:hi], self.num_tokens[a:b])

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        offsets = [np.zeros(1, dtype=np.int32)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return Rows(np.concatenate([p.ids for p in parts]), np.concatenate(offsets).astype(np.int32),
                     np.concatenate([p.starts for p in parts]), np.concatenate([p.num_tokens for p in parts]))


@dataclass(frozen=True)
class Framing:
    """Sequence-level layout: ``prefix + row + suffix`` (+ ``pad_id`` padding) = ``seq_len`` tokens."""

    seq_len: int
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    pad_id: int | None = None

    @property
    def row_tokens(self) -> int:
        """Stream tokens per sequence: ``seq_len`` minus the framing tokens."""
        return self.seq_len - len(self.prefix) - len(self.suffix)

    def frame(self, rows: np.ndarray, offsets: np.ndarray, starts: np.ndarray, dtype: np.dtype) -> Rows:
        """Frame full ``(n, row_tokens)`` rows."""
        n = len(rows)
        num = np.full(n, self.seq_len, dtype=np.int32)
        if not self.prefix and not self.suffix:
            return Rows(rows.astype(dtype, copy=False), offsets.astype(np.int32), starts.astype(np.int32), num)
        ids = np.empty((n, self.seq_len), dtype=dtype)
        p, r = len(self.prefix), self.row_tokens
        ids[:, :p] = self.prefix
        ids[:, p:p + r] = rows
        ids[:, p + r:] = self.suffix
        return Rows(ids, offsets.astype(np.int32), (starts + p).astype(np.int32), num)

    def frame_padded(self, tokens: np.ndarray, starts: np.ndarray, dtype: np.dtype) -> Rows:
        """One sequence from fewer than ``row_tokens`` stream tokens, padded with ``pad_id``."""
        p = len(self.prefix)
        real = np.concatenate([np.asarray(self.prefix, dtype=dtype), tokens.astype(dtype), np.asarray(self.suffix, dtype=dtype)])
        ids = np.full((1, self.seq_len), self.pad_id, dtype=dtype)
        ids[0, : len(real)] = real
        return Rows(ids, np.array([0, len(starts)], dtype=np.int32), (np.asarray(starts) + p).astype(np.int32),
                    np.array([len(real)], dtype=np.int32))


class StreamPacker:
    """Cuts a token stream into full rows of ``row_tokens``, carrying the remainder to the next call.

    Counts: ``documents``, ``tokens`` (stream tokens fed in) and ``rows`` (full rows cut).
    """

    def __init__(self, row_tokens: int, dtype: np.dtype = np.dtype(np.uint32)):
        if row_tokens < 2:
            raise ValueError(f"a packed row needs >= 2 stream tokens (a token and its target), got {row_tokens}")
        self.row_tokens, self.dtype = row_tokens, np.dtype(dtype)
        self._carry = np.empty(0, dtype=self.dtype)
        self._carry_starts = np.empty(0, dtype=np.int64)
        self.documents = 0
        self.tokens = 0
        self.rows = 0

    def add(self, stream: np.ndarray, doc_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Append documents laid end to end in ``stream`` (``doc_lengths`` tokens each).

        Returns the full rows it completes as ``(rows (n, row_tokens), offsets (n + 1,), starts)``.
        """
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        starts = np.zeros(len(doc_lengths), dtype=np.int64)
        np.cumsum(doc_lengths[:-1], out=starts[1:])
        self.documents += len(doc_lengths)
        return self.add_segments(stream, starts)

    def add_segments(self, tokens: np.ndarray, starts: np.ndarray, boundary_at_start: bool = False):
        """Append ``tokens`` whose document boundaries are ``starts`` (positions in ``tokens``).

        With ``boundary_at_start`` a boundary is recorded where ``tokens`` begin, unless they
        begin a row (a row start needs none): used when stitching tails of different parts.
        """
        starts = np.asarray(starts, dtype=np.int64)
        carried = len(self._carry)
        if boundary_at_start and carried and len(tokens) and (len(starts) == 0 or starts[0] != 0):
            starts = np.concatenate([[0], starts])
        self.tokens += len(tokens)
        buf = np.concatenate([self._carry, np.asarray(tokens, dtype=self.dtype)]) if carried else np.asarray(tokens, dtype=self.dtype)
        all_starts = np.concatenate([self._carry_starts, starts + carried]) if carried else starts
        r = self.row_tokens
        n = len(buf) // r
        cut = n * r
        inside = all_starts < cut
        s = all_starts[inside]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(s // r, minlength=n), out=offsets[1:])
        self._carry = buf[cut:].copy()
        self._carry_starts = all_starts[~inside] - cut
        self.rows += n
        return buf[:cut].reshape(n, r), offsets, s % r

    def take_tail(self) -> tuple[np.ndarray, np.ndarray]:
        """Remove and return the carried partial row: ``(tokens, starts)``, fewer than ``row_tokens`` tokens."""
        tail = (self._carry, self._carry_starts)
        self._carry = np.empty(0, dtype=self.dtype)
        self._carry_starts = np.empty(0, dtype=np.int64)
        return tail


class Packer:
    """One document at a time: ``[bos] + ids + [eos]`` into ``(seq_len,)`` int64 sequences.

    The per-document interface over :class:`StreamPacker` for streaming callers (pretrain's
    raw-corpus path); ``bos`` only when it is defined and differs from ``eos``.
    """

    def __init__(self, seq_len: int, eos_id: int, bos_id: int | None = None):
        self.seq_len = seq_len
        self.prefix = [bos_id] if bos_id is not None and bos_id != eos_id else []
        self.suffix = [eos_id]
        self._stream = StreamPacker(seq_len, np.dtype(np.int64))
        self.tokens_dropped = 0
        """Tokens of the final partial sequence, dropped by :meth:`finish`."""

    @property
    def documents(self) -> int:
        return self._stream.documents

    @property
    def tokens(self) -> int:
        """Tokens fed in, special tokens included."""
        return self._stream.tokens

    @property
    def sequences(self) -> int:
        return self._stream.rows

    def add(self, ids) -> Iterator[tuple[np.ndarray, list[int]]]:
        """Add one document's ids; yields every ``(sequence, document_starts)`` it completes."""
        doc = np.concatenate([np.asarray(self.prefix, np.int64), np.asarray(ids, np.int64), np.asarray(self.suffix, np.int64)])
        rows, offsets, starts = self._stream.add(doc, np.asarray([len(doc)], np.int64))
        for i, row in enumerate(rows):
            yield row, starts[offsets[i]:offsets[i + 1]].tolist()

    def finish(self) -> None:
        """Drop the final partial sequence (fewer than ``seq_len`` tokens), counting its tokens."""
        tail, _ = self._stream.take_tail()
        self.tokens_dropped += len(tail)
