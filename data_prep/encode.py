"""Parse and tokenize blocks, in worker processes, returning each split's token stream in block order.

Worker processes are forked (``spawn`` where there is no ``fork``) before this process has used
the ``tokenizers`` thread pool, and each runs the encoder on ``threads`` threads (1 when there
are as many workers as cores), so JSON parsing and tokenization both scale with the worker count. Results come back in submission
order with at most ``2 * workers + 2`` blocks in flight, so memory stays flat however large the
corpus. The output does not depend on the worker count: every document is encoded on its own,
and the main process packs the streams in corpus order.

Documents longer than ``max_piece_chars`` are encoded in pieces cut at whitespace that follows a
non-space character (:func:`split_points`). No pre-token of the usual pre-tokenizers (GPT-2 /
ByteLevel regex, Metaspace, BERT whitespace) crosses such a cut, so the ids equal those of the
whole document; only a window with no whitespace at all (say 32k characters of base64) is cut hard. Pieces are encoded at most
``encode_batch_chars`` characters at a time, which bounds the memory of a 50 MB one-line document
to a few times its size (a whole-document ``Encoding`` costs about 100 bytes per token).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar, cast

import numpy as np

from data_prep.errors import UserError, WorkerDiedError
from data_prep.fim import FimSpec, fim_draw
from data_prep.reader import Block, parse_block

if TYPE_CHECKING:
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

TRAIN, VAL = "train", "val"
"""The split names: folder names of the shards, keys of the manifest's ``splits``."""
SPLITS = (TRAIN, VAL)
T = TypeVar("T")


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
    max_piece_chars: int = 1 << 16
    """Documents longer than this many characters are encoded in pieces."""
    encode_batch_chars: int = 1 << 20
    """At most this many characters per ``encode_batch_fast`` call."""
    fim: FimSpec | None = None
    """Fill-in-the-middle applied to each document before tokenizing (data_prep.fim); None = off."""
    fim_ids: tuple[int, int, int] = (-1, -1, -1)
    """Token ids of ``<fim_prefix>``, ``<fim_middle>``, ``<fim_suffix>``."""


@dataclass
class Encoded:
    """One block's result: per split, the token stream and the tokens of each document in it."""

    source: str
    input_bytes: int
    streams: dict[str, np.ndarray]
    doc_lengths: dict[str, np.ndarray]
    rejects: list[tuple[int, str]]
    text_bytes: dict[str, int]
    """UTF-8 bytes of the documents' text per split, before any FIM rearranging (bits per byte's denominator)."""


def is_validation(text: str, val_fraction: float) -> bool:
    """True when the document's content hash (blake2b, 64 bit) falls below ``val_fraction``."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


_WS_AFTER_NON_WS = re.compile(r"(?<=\S)\s")


def _last_cut(text: str, lo: int, hi: int) -> int | None:
    """The last safe cut in ``text[lo:hi]``: before a space after a non-space, else before any whitespace after a non-space."""
    cut = text.rfind(" ", lo, hi)
    while cut > lo and text[cut - 1].isspace():
        cut = text.rfind(" ", lo, cut)
    if cut > lo:
        return cut
    last = None
    for m in _WS_AFTER_NON_WS.finditer(text, lo, hi):
        last = m.start()
    return last


def split_points(text: str, max_piece_chars: int) -> list[int]:
    """Character offsets ``0 = c0 < c1 < ... < len(text)`` cutting ``text`` into pieces of at most ``max_piece_chars``.

    Each cut, searched in the second half of the window, is just before a space that follows a
    non-space character (a pre-token boundary for GPT-2 / ByteLevel, Metaspace and BERT
    pre-tokenizers), else before any whitespace that follows a non-space (a boundary for GPT-2 /
    ByteLevel and BERT), else hard at ``max_piece_chars``.
    """
    cuts, start, n = [0], 0, len(text)
    while n - start > max_piece_chars:
        limit = start + max_piece_chars
        cut = _last_cut(text, start + max_piece_chars // 2, limit)
        cut = cut if cut is not None and cut > start else limit
        cuts.append(cut)
        start = cut
    cuts.append(n)
    return cuts


@functools.lru_cache(maxsize=4)
def _tokenizer_from_file(path: str, mtime_ns: int, size_bytes: int):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def load_tokenizer_file(path: str):
    """``tokenizers.Tokenizer.from_file(path)``, loaded once per process while the file is unchanged (a 16k-token
    ``tokenizer.json`` takes about 50 ms: prep reads its ids and then encodes with it)."""
    st = os.stat(path)
    return _tokenizer_from_file(str(path), st.st_mtime_ns, st.st_size)


class Encoder:
    """Tokenizes blocks into per-split token streams (see module docstring)."""

    def __init__(self, spec: EncodeSpec):
        self.spec = spec
        self.tokenizer = load_tokenizer_file(spec.tokenizer_file)
        self.tokenizer.no_padding()  # a tokenizer.json may carry padding / truncation settings
        self.tokenizer.no_truncation()
        self.dtype = np.dtype(spec.dtype)
        self._id_limit = np.iinfo(self.dtype).max

    def _pieces(self, texts: list[str]) -> Iterator[tuple[int, str]]:
        """``(document index, piece)`` pairs, produced lazily so only one batch of slices exists."""
        limit = self.spec.max_piece_chars
        for i, text in enumerate(texts):
            if len(text) <= limit:
                yield i, text
                continue
            cuts = split_points(text, limit)
            for a, b in zip(cuts, cuts[1:]):
                yield i, text[a:b]

    def _encode_batch(self, batch: list[str], owners: list[int], parts: list[list[np.ndarray]]) -> None:
        for enc, owner in zip(self.tokenizer.encode_batch_fast(batch, add_special_tokens=False), owners):
            ids = np.array(enc.ids, dtype=np.uint32)
            if len(ids) and int(ids.max()) > self._id_limit:
                raise UserError(f"{self.spec.tokenizer_file}: produced token id {int(ids.max())}, which does not fit the "
                                f"{self.dtype.name} chosen from its vocabulary size; the tokenizer's ids are not contiguous")
            parts[owner].append(ids.astype(self.dtype, copy=False))

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        """Ids (``self.dtype``, no special tokens) of each text; long texts in pieces, batches bounded in characters."""
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        batch: list[str] = []
        owners: list[int] = []
        chars = 0
        for owner, piece in self._pieces(texts):
            if batch and chars + len(piece) > self.spec.encode_batch_chars:
                self._encode_batch(batch, owners, parts)
                batch, owners, chars = [], [], 0
            batch.append(piece)
            owners.append(owner)
            chars += len(piece)
        if batch:
            self._encode_batch(batch, owners, parts)
        return [p[0] if len(p) == 1 else np.concatenate(p) if p else np.empty(0, self.dtype) for p in parts]

    def _stream(self, ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        pre, suf = self.spec.doc_prefix, self.spec.doc_suffix
        lengths = np.array([len(x) + len(pre) + len(suf) for x in ids], dtype=np.int64)
        out = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for x, n in zip(ids, lengths):
            out[pos:pos + len(pre)] = pre
            out[pos + len(pre):pos + n - len(suf)] = x
            out[pos + n - len(suf):pos + n] = suf
            pos += n
        return out, lengths

    def encode(self, block: Block) -> Encoded:
        """Parse, drop the documents ``block.keep`` marks False (duplicates), tokenize and split."""
        parsed = parse_block(block, self.spec.text_column)
        if block.keep is not None:
            keep = cast(np.ndarray, block.keep)  # Block.keep is None or a bool array
            if len(keep) != len(parsed.texts):
                raise RuntimeError(f"{block.source}: the dedup pass saw {len(keep)} documents in the block at "
                                   f"record {block.first_record}, this pass {len(parsed.texts)}; did the file change?")
            parsed.texts = [t for t, k in zip(parsed.texts, keep.tolist()) if k]
        fim = self.spec.fim
        ids = self._encode_fim(parsed.texts, fim) if fim is not None and fim.enabled else self._encode_texts(parsed.texts)
        to_val = [is_validation(t, self.spec.val_fraction) for t in parsed.texts]
        sizes = [len(t.encode("utf-8", "surrogatepass")) for t in parsed.texts]
        del parsed.texts
        streams, lengths, text_bytes = {}, {}, {}
        for split, want in ((TRAIN, False), (VAL, True)):
            streams[split], lengths[split] = self._stream([x for x, v in zip(ids, to_val) if v == want])
            text_bytes[split] = sum(n for n, v in zip(sizes, to_val) if v == want)
        return Encoded(block.source, block.input_bytes, streams, lengths, parsed.rejects, text_bytes)

    def _encode_fim(self, texts: list[str], fim: FimSpec) -> list[np.ndarray]:
        """Ids of each text after :func:`data_prep.fim.fim_draw`'s rearranging: prefix, middle and suffix are
        tokenized apart (as SantaCoder / StarCoder do) and joined by the sentinel ids, so no token spans a cut
        and a sentinel is one id wherever it falls."""
        pre, mid, suf = (np.array([i], dtype=self.dtype) for i in self.spec.fim_ids)
        segments: list[str] = []
        layouts: list[list] = []
        for text in texts:
            drawn = fim_draw(text, fim)
            if drawn is None:
                layouts.append([len(segments)])
                segments.append(text)
                continue
            mode, lo, hi = drawn
            k = len(segments)
            segments += [text[:lo], text[lo:hi], text[hi:]]  # prefix k, middle k+1, suffix k+2
            layouts.append([pre, k, suf, k + 2, mid, k + 1] if mode == "psm" else [pre, suf, k + 2, mid, k, k + 1])
        encoded = self._encode_texts(segments)
        return [np.concatenate([encoded[x] if isinstance(x, int) else x for x in layout]) for layout in layouts]


_WORKER_ENCODERS: dict[EncodeSpec, Encoder] = {}


def _init_worker(threads: int, marker_dir: str) -> None:
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    marker = Path(marker_dir) / str(os.getpid())

    def on_term(signum, frame) -> None:  # the pool ends the others after one dies: not the culprit, clear its marker
        marker.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)


def _tracked(fn: Callable[[Block], T], marker_dir: str, block: Block) -> T:
    """``fn(block)`` with ``marker_dir/<pid>`` naming the block while it runs: a marker left behind names the
    input of a worker that died without an exception (SIGKILL cannot be caught)."""
    marker = Path(marker_dir) / str(os.getpid())
    marker.write_text(f"{block.source} (from record {block.first_record})")
    try:
        return fn(block)
    finally:
        marker.unlink()


def _died(marker_dir: str, broken: BrokenProcessPool) -> WorkerDiedError:
    """The one-line error for a broken pool: each worker whose marker remains, and the input it was reading."""
    left = sorted(Path(marker_dir).iterdir())
    which = "; ".join(f"worker pid {m.name} while reading {m.read_text()}" for m in left) or "a worker (input unknown)"
    return WorkerDiedError(f"prep: {which} died from a signal (no Python error), likely the out-of-memory killer (SIGKILL); "
                           f"retry with fewer --workers or more memory ({broken})")


def _encode_in_worker(spec: EncodeSpec, block: Block) -> Encoded:
    encoder = _WORKER_ENCODERS.get(spec)
    if encoder is None:
        encoder = _WORKER_ENCODERS[spec] = Encoder(spec)
    return encoder.encode(block)


def default_workers() -> int:
    """One worker per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _start_method() -> str:
    """``fork`` where the platform has it (starts in milliseconds, never re-imports ``__main__``), else ``spawn``."""
    import multiprocessing

    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def encode_blocks(blocks: Iterable[Block], spec: EncodeSpec, workers: int) -> Iterator[Encoded]:
    """``Encoded`` results of ``blocks`` in order; ``workers <= 1`` encodes in this process.

    Worker exceptions are re-raised here; the pool is shut down however the iteration ends.
    """
    if workers <= 1:
        encoder = Encoder(spec)
        for block in blocks:
            yield encoder.encode(block)
        return
    yield from map_blocks(functools.partial(_encode_in_worker, spec), blocks, workers)


def map_blocks(fn: Callable[[Block], T], blocks: Iterable[Block], workers: int) -> Iterator[T]:
    """``fn(block)`` for each block, in order, on ``workers`` processes (in this one when ``workers <= 1``);
    at most ``2 * workers + 2`` blocks in flight. ``fn`` must pickle (a module-level function or a partial of one).

    Worker exceptions are re-raised here; the pool is shut down however the iteration ends.

    Raises:
        WorkerDiedError: a worker died from a signal (SIGKILL from the out-of-memory killer, a crash); names
            the worker and the input file and record it was reading (from a marker file each task keeps
            in a temporary folder while it runs).
    """
    if workers <= 1:
        yield from map(fn, blocks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool  # here: ~20 ms of imports a one-worker prep skips

    threads = max(1, default_workers() // workers)
    marker_dir = tempfile.mkdtemp(prefix="lmforge-prep-workers-")
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(_start_method()),
                               initializer=_init_worker, initargs=(threads, marker_dir))
    window: collections.deque[Future] = collections.deque()
    task = functools.partial(_tracked, fn, marker_dir)
    try:
        for block in blocks:
            window.append(pool.submit(task, block))
            if len(window) >= 2 * workers + 2:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    except BrokenProcessPool as broken:
        pool.shutdown(wait=True, cancel_futures=True)
        raise _died(marker_dir, broken) from broken
    finally:
        for fut in window:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(marker_dir, ignore_errors=True)
