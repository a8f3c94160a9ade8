"""Text for training and evaluating tokenizers: streamed in batches from the corpus reader, optionally sampled to a byte budget.

Sampling is deterministic and uniform across sources: a document is kept when its keyed content
hash falls below a threshold, so every file contributes in proportion to its size, position in
the corpus does not matter, and the same corpus and seed keep the same documents. The key
(``lmforge-tokenizer/seed=N``) makes the choice independent of prep's unkeyed held-out hash.

The threshold is exact: a first pass adds each document's UTF-8 bytes into a histogram over
``2**16`` hash buckets (512 KiB, whatever the corpus size) and keeps the largest prefix of buckets
whose bytes fit ``max_bytes``; the second pass streams those documents. So the kept text never
exceeds the budget and the memory never depends on the corpus size. The first pass is skipped
when the inputs are uncompressed text or jsonl whose on-disk size already fits the budget (text
bytes <= file bytes there).
"""
from __future__ import annotations

import hashlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np
from tqdm import tqdm

from data_prep.reader import JSONL_SUFFIXES, TEXT_SUFFIXES, Document, RejectLog, iter_documents, resolve_inputs

log = logging.getLogger(__name__)

HASH_BUCKETS_LOG2 = 16
"""Histogram resolution of the first pass: the budget is met to within one bucket (1/65536 of the corpus)."""
DEFAULT_BATCH_BYTES = 1 << 20
T = TypeVar("T")
_DONE = object()
_UNCOMPRESSED = tuple(s for s in JSONL_SUFFIXES if not s.endswith((".gz", ".zst"))) + TEXT_SUFFIXES


@dataclass
class CorpusStats:
    """What one pass over the training text saw."""

    documents: int = 0
    """Documents kept (handed to the trainer)."""
    text_bytes: int = 0
    """UTF-8 bytes of the kept documents."""
    seen_documents: int = 0
    """Good documents read, kept or not."""
    rejects: RejectLog = field(default_factory=RejectLog)


def _encode(doc: Document, rejects: RejectLog) -> bytes | None:
    try:
        return doc.text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a JSON \ud800 escape: no valid UTF-8, tokenizers would refuse it
        rejects.add(doc.source, doc.record, f"lone surrogate at character {exc.start}")
        return None


class CorpusText:
    """The (sampled) text of ``inputs``, for training or evaluating tokenizers.

    :meth:`batches` can be iterated as often as needed and yields the same text each time.

    Args:
        inputs: paths, globs, directories or ``stdlib`` (see :mod:`data_prep.reader`).
        text_column: the field holding the text in jsonl and parquet records.
        max_bytes: budget of UTF-8 text bytes; ``None`` keeps everything.
        seed: sampling seed; another seed draws another sample of the same size.
        batch_bytes: text bytes per batch handed to the trainer (memory per batch, not a total).

    Raises:
        InputError: missing inputs (see :func:`data_prep.reader.resolve_inputs`), at construction.
    """

    def __init__(self, inputs: Sequence[str], text_column: str = "text", max_bytes: int | None = None,
                 seed: int = 0, batch_bytes: int = DEFAULT_BATCH_BYTES, show_progress: bool = False):
        self.files = resolve_inputs(list(inputs))
        self.inputs = list(inputs)
        self.text_column = text_column
        self.max_bytes = max_bytes
        self.batch_bytes = batch_bytes
        self.show_progress = show_progress
        self._key = f"lmforge-tokenizer/seed={seed}".encode()
        self._keep_buckets: int | None = None  # None: keep all
        self.corpus_text_bytes: int | None = None
        """UTF-8 bytes of all good documents; known after the first sampling pass only."""
        self._planned = False

    def _bucket(self, data: bytes) -> int:
        digest = hashlib.blake2b(data, digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little") >> (64 - HASH_BUCKETS_LOG2)

    def _disk_upper_bound(self) -> int | None:
        """On-disk bytes when they bound the text bytes from above (uncompressed jsonl / text), else None."""
        if all(p.name.endswith(_UNCOMPRESSED) for p in self.files):
            return sum(p.stat().st_size for p in self.files)
        return None

    def plan(self) -> None:
        """Choose the sampling threshold (first pass over the corpus when a budget may bind)."""
        if self._planned:
            return
        self._planned = True
        bound = self._disk_upper_bound()
        if self.max_bytes is None or (bound is not None and bound <= self.max_bytes):
            return
        hist = np.zeros(1 << HASH_BUCKETS_LOG2, dtype=np.int64)
        scratch = RejectLog()  # the second pass records the rejects
        bar = tqdm(desc="tokenizer sample (pass 1)", unit="doc", disable=not self.show_progress)
        for doc in iter_documents(self.files, self.text_column, scratch):
            data = _encode(doc, scratch)
            if data is not None:
                hist[self._bucket(data)] += len(data)
            bar.update(1)
        bar.close()
        cumulative = np.cumsum(hist)
        self.corpus_text_bytes = int(cumulative[-1])
        self._keep_buckets = int(np.searchsorted(cumulative, self.max_bytes, side="right"))
        if self._keep_buckets >= len(hist):
            self._keep_buckets = None
        else:
            kept = int(cumulative[self._keep_buckets - 1]) if self._keep_buckets else 0
            log.info("tokenizer sample: %d of %d text bytes (%.1f%%, budget %d)", kept, self.corpus_text_bytes,
                     100.0 * kept / max(self.corpus_text_bytes, 1), self.max_bytes)

    @property
    def keep_fraction(self) -> float:
        """Fraction of the hash space kept (1.0: no sampling)."""
        return 1.0 if self._keep_buckets is None else self._keep_buckets / (1 << HASH_BUCKETS_LOG2)

    def batches(self, stats: CorpusStats | None = None) -> Iterator[list[str]]:
        """Yield the kept document texts in batches of about ``batch_bytes``; counts go to ``stats``.

        Memory: one batch (plus the reader's current record); nothing else is held.
        """
        self.plan()
        stats = stats if stats is not None else CorpusStats()
        keep = self._keep_buckets
        bar = tqdm(total=self.corpus_text_bytes or self._disk_upper_bound(), desc="tokenizer corpus", unit="B",
                   unit_scale=True, disable=not self.show_progress)
        batch: list[str] = []
        batch_size = 0
        for doc in iter_documents(self.files, self.text_column, stats.rejects):
            data = _encode(doc, stats.rejects)
            if data is None:
                continue
            stats.seen_documents += 1
            bar.update(len(data))
            if keep is not None and self._bucket(data) >= keep:
                continue
            stats.documents += 1
            stats.text_bytes += len(data)
            batch.append(doc.text)
            batch_size += len(data)
            if batch_size >= self.batch_bytes:
                yield batch
                batch, batch_size = [], 0
        bar.close()
        if batch:
            yield batch

    def describe(self) -> str:
        """The inputs as one string, for error messages."""
        return ", ".join(str(i) for i in self.inputs)


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` ahead (memory: ``depth`` items).

    The tokenizers trainer consumes batches from its Rust threads; reading and parsing the next
    batch here (JSON decoding, hashing) then overlaps with the word counting instead of stalling it.
    An exception in the reader is re-raised in the consumer; closing the consumer stops the reader.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    reader = threading.Thread(target=read, name="tokenizer-corpus-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()

