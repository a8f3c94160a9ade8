"""Parse and tokenize blocks, in worker processes, returning each split's token stream in block order.

Worker processes are started with ``spawn`` (no inherited Rust thread pool) and each runs the
``tokenizers`` encoder on ``threads`` threads (1 when there are as many workers as cores), so
JSON parsing and tokenization both scale with the worker count. Results come back in submission
order with at most ``2 * workers + 2`` blocks in flight, so memory stays flat however large the
corpus. The output does not depend on the worker count: every document is encoded on its own,
and the main process packs the streams in corpus order.

Documents longer than ``max_piece_chars`` are encoded in pieces cut just before a space that
follows a non-space character. For the usual pre-tokenizers (GPT-2 / ByteLevel regex, Metaspace,
BERT whitespace) no pre-token crosses such a cut, so the ids equal those of the whole document;
a document with no such space in a window is cut hard. Pieces are encoded at most
``encode_batch_chars`` characters at a time, which bounds the memory of a 50 MB one-line document
to a few times its size instead of the ~100 bytes per token of whole-document ``Encoding`` s.
"""
from __future__ import annotations

import collections
import hashlib
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from data_prep.reader import Block, parse_block

SPLITS = ("train", "val")


@dataclass(frozen=True)
class EncodeSpec:
    """What a worker needs to turn a block into token streams."""

    tokenizer_file: str
    text_column: str
    val_fraction: float
    """Fraction of documents, by content hash, that go to ``val``."""
    doc_prefix: tuple[int, ...]
    """Token ids put before every document (BOS)."""
    doc_suffix: tuple[int, ...]
    """Token ids put after every document (EOS, or SEP for MLM)."""
    dtype: str
    """``uint16`` or ``uint32``: the token dtype of the streams and shards."""
    max_piece_chars: int = 1 << 20
    """Documents longer than this many characters are encoded in pieces."""
    encode_batch_chars: int = 1 << 22
    """At most this many characters per ``encode_batch_fast`` call."""


@dataclass
class Encoded:
    """One block's result: per split, the token stream and the tokens of each document in it."""

    source: str
    input_bytes: int
    streams: dict[str, np.ndarray]
    doc_lengths: dict[str, np.ndarray]
    rejects: list[tuple[int, str]]


def is_validation(text: str, val_fraction: float) -> bool:
    """True when the document's content hash (blake2b, 64 bit) falls below ``val_fraction``."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def split_points(text: str, max_piece_chars: int) -> list[int]:
    """Character offsets ``0 = c0 < c1 < ... < len(text)`` cutting ``text`` into pieces of at most ``max_piece_chars``.

    Each cut is just before a space that follows a non-space character, searched in the second
    half of the window; where there is none the cut is hard (at ``max_piece_chars``).
    """
    cuts, start, n = [0], 0, len(text)
    while n - start > max_piece_chars:
        limit = start + max_piece_chars
        cut = text.rfind(" ", start + max_piece_chars // 2, limit)
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(" ", start + max_piece_chars // 2, cut)
        cut = cut if cut > start else limit
        cuts.append(cut)
        start = cut
    cuts.append(n)
    return cuts


class Encoder:
    """Tokenizes blocks into per-split token streams (see module docstring)."""

    def __init__(self, spec: EncodeSpec):
        from tokenizers import Tokenizer

        self.spec = spec
        self.tokenizer = Tokenizer.from_file(spec.tokenizer_file)
        self.dtype = np.dtype(spec.dtype)
        self._id_limit = np.iinfo(self.dtype).max

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        """uint32 ids of each text (no special tokens), long texts in pieces."""
        spec = self.spec
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            if len(text) <= spec.max_piece_chars:
                pieces.append(text)
                owners.append(i)
            else:
                cuts = split_points(text, spec.max_piece_chars)
                pieces.extend(text[a:b] for a, b in zip(cuts, cuts[1:]))
                owners.extend([i] * (len(cuts) - 1))
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        batch: list[str] = []
        batch_owners: list[int] = []
        chars = 0
        for piece, owner in zip(pieces + [None], owners + [None]):
            if piece is not None and (not batch or chars + len(piece) <= spec.encode_batch_chars):
                batch.append(piece)
                batch_owners.append(owner)
                chars += len(piece)
                continue
            for enc, o in zip(self.tokenizer.encode_batch_fast(batch, add_special_tokens=False), batch_owners):
                parts[o].append(np.array(enc.ids, dtype=np.uint32))
            batch, batch_owners, chars = ([piece], [owner], len(piece)) if piece is not None else ([], [], 0)
        return [p[0] if len(p) == 1 else np.concatenate(p) if p else np.empty(0, np.uint32) for p in parts]

    def _stream(self, ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        pre, suf = self.spec.doc_prefix, self.spec.doc_suffix
        lengths = np.array([len(x) + len(pre) + len(suf) for x in ids], dtype=np.int64)
        out = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for x, n in zip(ids, lengths):
            if len(x) and int(x.max()) > self._id_limit:
                raise ValueError(f"token id {int(x.max())} does not fit {self.dtype.name}")
            out[pos:pos + len(pre)] = pre
            out[pos + len(pre):pos + n - len(suf)] = x
            out[pos + n - len(suf):pos + n] = suf
            pos += n
        return out, lengths

    def encode(self, block: Block) -> Encoded:
        parsed = parse_block(block, self.spec.text_column)
        ids = self._encode_texts(parsed.texts)
        to_val = [is_validation(t, self.spec.val_fraction) for t in parsed.texts]
        del parsed.texts
        streams, lengths = {}, {}
        for split, want in (("train", False), ("val", True)):
            streams[split], lengths[split] = self._stream([x for x, v in zip(ids, to_val) if v == want])
        return Encoded(block.source, block.input_bytes, streams, lengths, parsed.rejects)


_WORKER_ENCODER: Encoder | None = None


def _init_worker(spec: EncodeSpec, threads: int) -> None:
    global _WORKER_ENCODER
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    _WORKER_ENCODER = Encoder(spec)


def _encode_in_worker(block: Block) -> Encoded:
    return _WORKER_ENCODER.encode(block)


def default_workers() -> int:
    """One worker per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def encode_blocks(blocks: Iterable[Block], spec: EncodeSpec, workers: int) -> Iterator[Encoded]:
    """``Encoded`` results of ``blocks`` in order; ``workers <= 1`` encodes in this process.

    Worker exceptions are re-raised here; the pool is shut down however the iteration ends.
    """
    if workers <= 1:
        encoder = Encoder(spec)
        for block in blocks:
            yield encoder.encode(block)
        return
    import multiprocessing

    threads = max(1, default_workers() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(spec, threads))
    window: collections.deque[Future] = collections.deque()
    try:
        for block in blocks:
            window.append(pool.submit(_encode_in_worker, block))
            if len(window) >= 2 * workers + 2:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        for fut in window:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
