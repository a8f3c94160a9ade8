"""The one corpus reader, shared by tokenizer training and prep.

Reading is split in two steps so that prep can parse in worker processes:

1. :func:`read_blocks` (main process, sequential I/O) cuts a :class:`~data_prep.sources.Segment`
   into :class:`Block` s of about ``block_bytes``: whole lines of jsonl or per-line text, a whole
   text file, or a column chunk of parquet / Arrow / Hub rows. Whole-input problems raise
   :class:`~data_prep.errors.InputError` here (missing text column, corrupt or truncated file).
2. :func:`parse_block` (any process) turns a block into document texts and rejected records.

Record-level problems (malformed JSON, invalid UTF-8, a missing, null or non-string text field, an
empty or whitespace-only document) are rejected with the record number and counted; the read goes
on. Record numbers are 1-based lines for jsonl and per-line text, 0-based rows for parquet, Arrow
and Hub datasets, and 0 for a whole-file text document. Blank lines are separators, not records.
A UTF-8 byte-order mark at the start of a jsonl or text file is dropped, not rejected.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence, cast

from data_prep.errors import InputError
from data_prep.sources import (  # noqa: F401 (re-exported)
    JSONL_SUFFIXES,
    KNOWN_SUFFIXES,
    PARQUET_SUFFIXES,
    TEXT_SUFFIXES,
    Segment,
    Source,
    plan_segments,
    resolve_sources,
    stdlib_files,
)

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_BLOCK_BYTES = 1 << 20
COUNT_CHUNK_BYTES = 1 << 24
UTF8_BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte-order mark some editors write first in a file: dropped there, never part of a document."""


@dataclass(frozen=True)
class Document:
    """One document: its text, the source it came from, and its record number there."""

    text: str
    source: str
    record: int


@dataclass
class Block:
    """A piece of one source, read in the main process and parsed anywhere.

    ``kind`` is ``jsonl`` or ``lines`` (``payload``: bytes of whole lines, the first being line
    ``first_record``), ``file`` (bytes of a whole text file) or ``values`` (a pyarrow array or list
    of text-column values, the first being row ``first_record``). ``input_bytes`` is what the block
    covers on disk (for progress; 0 for Hub rows).
    """

    source: str
    kind: str
    first_record: int
    payload: object
    input_bytes: int
    keep: object = None
    """None, or a bool array with one entry per document the block parses to: False drops it (a duplicate,
    :mod:`data_prep.dedup`)."""


@dataclass
class Parsed:
    """Documents and rejected records of one block, in record order."""

    texts: list[str] = field(default_factory=list)
    records: list[int] = field(default_factory=list)
    rejects: list[tuple[int, str]] = field(default_factory=list)


class RejectLog:
    """Counts rejected records by reason and writes them as jsonl (source, record, reason).

    The file is written to ``path + '.tmp'`` and renamed on :meth:`close`, so a crashed run never
    leaves a rejects file that looks complete. ``path=None`` counts without writing.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.counts: Counter[str] = Counter()
        """Rejects per full reason (``invalid UTF-8 at byte 7``)."""
        self.kinds: Counter[str] = Counter()
        """Rejects per kind: the reason without its position or detail (``invalid UTF-8``)."""
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._tmp, "w", encoding="utf-8")

    @property
    def _tmp(self) -> Path:
        assert self.path is not None  # only used when writing, which needs a path
        return self.path.with_name(self.path.name + ".tmp")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, source: str, record: int, reason: str) -> None:
        self.counts[reason] += 1
        self.kinds[reason.split(":")[0].split(" at ")[0]] += 1
        if self._fh is not None:
            self._fh.write(json.dumps({"source": source, "record": record, "reason": reason}) + "\n")

    def add_many(self, source: str, rejects: Iterable[tuple[int, str]]) -> None:
        for record, reason in rejects:
            self.add(source, record, reason)

    def close(self) -> None:
        """Finish the file: rename the temporary file into place."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            assert self.path is not None  # a file is open only when a path was given
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Close after a failed run, leaving only the temporary file (nothing that looks complete)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ---------------------------------------------------------------- reading (main process)

def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _count_newlines(path: str, end: int) -> int:
    count = 0
    with open(path, "rb") as fh:
        while end > 0 and (chunk := fh.read(min(COUNT_CHUNK_BYTES, end))):
            count += chunk.count(b"\n")
            end -= len(chunk)
    return count


def _line_blocks(seg: Segment, kind: str, block_bytes: int) -> Iterator[Block]:
    """Blocks of whole lines whose first byte lies in ``[seg.start, seg.end)``."""
    path, end = seg.source.path, seg.end
    with _open_binary(path) as fh:
        pos = 0
        if seg.start > 0:
            fh.seek(seg.start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # this line began in the previous range
            pos = fh.tell()
        line = 1 + (_count_newlines(path, pos) if pos else 0)
        while end is None or pos < end:
            chunk = fh.read(block_bytes)
            if not chunk:
                break
            if not chunk.endswith(b"\n"):
                chunk += fh.readline()  # finish the last line, however long
            if end is not None and pos + len(chunk) > end:
                cut = chunk.find(b"\n", max(0, end - pos - 1))
                chunk = chunk[: cut + 1] if cut >= 0 else chunk
            payload = chunk[len(UTF8_BOM):] if pos == 0 and chunk.startswith(UTF8_BOM) else chunk
            yield Block(path, kind, line, payload, len(chunk))
            line += chunk.count(b"\n")
            pos += len(chunk)


def _coalesce(arrays: Iterable, first_row: int, source: str, block_bytes: int, scale: float) -> Iterator[Block]:
    """Join small pyarrow column chunks into blocks of about ``block_bytes`` (``scale``: disk bytes per memory byte)."""
    import pyarrow as pa

    pending, size, row = [], 0, first_row
    for arr in arrays:
        pending.append(arr)
        size += arr.nbytes
        if size >= block_bytes:
            joined = pa.concat_arrays(pending) if len(pending) > 1 else pending[0]
            yield Block(source, "values", row, joined, int(size * scale))
            row += len(joined)
            pending, size = [], 0
    if pending:
        joined = pa.concat_arrays(pending) if len(pending) > 1 else pending[0]
        yield Block(source, "values", row, joined, int(size * scale))


def _missing_column(path: str, column: str, names: Sequence[str]) -> InputError:
    return InputError(f"{path}: text column '{column}' not found (columns: {', '.join(names)})")


def _parquet_blocks(seg: Segment, column: str, block_bytes: int) -> Iterator[Block]:
    import pyarrow.parquet as pq

    path = seg.source.path
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise _missing_column(path, column, pf.schema_arrow.names)
    meta = pf.metadata
    groups = seg.row_groups if seg.row_groups is not None else tuple(range(meta.num_row_groups))
    memory_bytes = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)) or 1
    scale = seg.source.size_bytes / memory_bytes
    for g in groups:
        first = sum(meta.row_group(i).num_rows for i in range(g))
        rows = meta.row_group(g).num_rows
        rows_per_batch = max(1, block_bytes * rows // max(1, meta.row_group(g).total_byte_size))
        chunks = (b.column(0) for b in pf.iter_batches(batch_size=rows_per_batch, row_groups=[g], columns=[column]))
        yield from _coalesce(chunks, first, path, block_bytes, scale)


def _arrow_blocks(seg: Segment, column: str, block_bytes: int) -> Iterator[Block]:
    import pyarrow as pa

    path = seg.source.path
    source = pa.memory_map(path, "r")
    reader = pa.ipc.open_file(source) if source.read(6) == b"ARROW1" else None
    if reader is None:
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        batches = iter(reader)
    else:
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    if column not in reader.schema.names:
        raise _missing_column(path, column, reader.schema.names)
    yield from _coalesce((b.column(column) for b in batches), 0, path, block_bytes, 1.0)


def _hub_blocks(seg: Segment, column: str, block_bytes: int) -> Iterator[Block]:
    import datasets

    spec, name = seg.source.hub, seg.source.path
    assert spec is not None  # hub sources always carry their HubSpec
    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    except Exception as exc:  # datasets raises many types (not found, connection, bad config)
        raise InputError(f"{name}: cannot open with datasets.load_dataset(streaming=True): {str(exc).splitlines()[0]}") from exc
    if ds.features is not None:
        if column not in ds.features:
            raise _missing_column(name, column, list(ds.features))
        ds = ds.select_columns([column])
    if seg.shard_of is not None:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=seg.shard_of[0], world_size=seg.shard_of[1])
    values, size, first = [], 0, 0
    for row in ds:
        value = row.get(column, _MISSING)
        values.append(value)
        size += len(value) if isinstance(value, str) else 0
        if size >= block_bytes:
            yield Block(name, "values", first, values, 0)
            first += len(values)
            values, size = [], 0
    if values:
        yield Block(name, "values", first, values, 0)


def read_blocks(seg: Segment, text_column: str = "text", text_mode: str = "file",
                block_bytes: int = DEFAULT_BLOCK_BYTES) -> Iterator[Block]:
    """Blocks of about ``block_bytes`` covering ``seg`` in record order.

    Raises:
        InputError: the text column is absent from a parquet / Arrow / Hub source, or the file is
            corrupt, truncated or unreadable (named, with the library's message).
    """
    src: Source = seg.source
    try:
        if src.kind == "hub":
            yield from _hub_blocks(seg, text_column, block_bytes)
        elif src.kind == "parquet":
            yield from _parquet_blocks(seg, text_column, block_bytes)
        elif src.kind == "arrow":
            yield from _arrow_blocks(seg, text_column, block_bytes)
        elif src.kind == "jsonl" or text_mode == "line":
            yield from _line_blocks(seg, "jsonl" if src.kind == "jsonl" else "lines", block_bytes)
        else:
            data = Path(src.path).read_bytes()
            yield Block(src.path, "file", 0, data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data, len(data))
    except InputError:
        raise
    except Exception as exc:  # gzip.BadGzipFile, zstd.ZstdError, EOFError, ArrowInvalid, OSError...
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise InputError(f"{src.path}: unreadable {src.kind} input ({type(exc).__name__}: {detail})") from exc


# ---------------------------------------------------------------- parsing (any process)

class _Missing:
    """Marks an absent field; pickles by name, so identity survives the trip to a worker process."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()


def _check(value: object, record: int, column: str, out: Parsed) -> None:
    if value is _MISSING:
        out.rejects.append((record, f"missing field '{column}'"))
    elif value is None:
        out.rejects.append((record, f"field '{column}' is null"))
    elif not isinstance(value, str):
        out.rejects.append((record, f"field '{column}' is {type(value).__name__}, not a string"))
    elif not value.strip():
        out.rejects.append((record, "empty document"))
    else:
        out.texts.append(value)
        out.records.append(record)


def _lines(payload: bytes) -> Iterator[memoryview]:
    """Each line of ``payload`` without its newline, as a view (no copy of a 50 MB line)."""
    view, start, n = memoryview(payload), 0, len(payload)
    while start < n:
        end = payload.find(b"\n", start)
        end = n if end < 0 else end
        yield view[start:end]
        start = end + 1


def _parse_jsonl(block: Block, column: str, out: Parsed) -> None:
    for i, raw in enumerate(_lines(cast(bytes, block.payload))):
        record = block.first_record + i
        try:
            line = str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            out.rejects.append((record, f"invalid UTF-8 at byte {exc.start}"))
            continue
        if not line.strip():
            continue  # blank separator lines are not records
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            out.rejects.append((record, f"malformed JSON: {exc.msg} at column {exc.colno}"))
            continue
        del line
        if not isinstance(obj, dict):
            out.rejects.append((record, f"record is a JSON {type(obj).__name__}, not an object"))
            continue
        _check(obj.get(column, _MISSING), record, column, out)


def _parse_lines(block: Block, out: Parsed) -> None:
    for i, raw in enumerate(_lines(cast(bytes, block.payload))):
        record = block.first_record + i
        raw = raw[:-1] if len(raw) and raw[-1] == 13 else raw  # \r of \r\n
        if not len(raw):
            continue
        try:
            text = str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            out.rejects.append((record, f"invalid UTF-8 at byte {exc.start}"))
            continue
        _check(text, record, "text", out)


def parse_block(block: Block, text_column: str = "text") -> Parsed:
    """Documents and rejects of one block (see module docstring for record numbers)."""
    out = Parsed()
    if block.kind == "jsonl":
        _parse_jsonl(block, text_column, out)
    elif block.kind == "lines":
        _parse_lines(block, out)
    elif block.kind == "file":
        try:
            text = cast(bytes, block.payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            out.rejects.append((0, f"invalid UTF-8 at byte {exc.start}"))
        else:
            _check(text, 0, "text", out)
    else:
        values = block.payload if isinstance(block.payload, list) else cast("pa.Array", block.payload).to_pylist()
        for i, value in enumerate(values):
            _check(value, block.first_record + i, text_column, out)
    return out


# ---------------------------------------------------------------- convenience for serial readers

def iter_documents(inputs: Sequence[str] | Iterable[Path], text_column: str = "text", rejects: RejectLog | None = None,
                   text_mode: str = "file") -> Iterator[Document]:
    """Yield every good document of ``inputs`` in corpus order, in this process.

    Args:
        inputs: see :mod:`data_prep.sources`.
        text_column: the field holding the text in jsonl, parquet, Arrow and Hub records.
        rejects: where rejected records go; a counting-only log when ``None``.
        text_mode: ``file`` (a plain-text file is one document) or ``line`` (each line is one).

    Raises:
        InputError: see :func:`~data_prep.sources.resolve_sources` and :func:`read_blocks`.
    """
    rejects = rejects if rejects is not None else RejectLog()
    for seg in plan_segments(resolve_sources([str(p) for p in inputs]), 0, 1, text_mode):
        for block in read_blocks(seg, text_column, text_mode):
            parsed = parse_block(block, text_column)
            rejects.add_many(block.source, parsed.rejects)
            for text, record in zip(parsed.texts, parsed.records):
                yield Document(text, block.source, record)


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    """The files of ``inputs`` (see :func:`~data_prep.sources.resolve_sources`).

    A Hub dataset stays as ``Path("hf:NAME...")``, which :func:`iter_documents` reads back.
    """
    return [Path(s.path) for s in resolve_sources(inputs)]


def total_input_bytes(inputs: Sequence[str]) -> int:
    """Sum of the on-disk sizes (bytes) of the resolved local input files; drives progress bars and sampling."""
    return sum(s.size_bytes for s in resolve_sources(list(inputs)))
