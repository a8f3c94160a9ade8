"""The one corpus reader, shared by tokenizer training and prep.

Inputs are paths, globs or directories of jsonl (plain, ``.gz``, ``.zst``), parquet or plain-text
files, or the word ``stdlib``: the Python standard-library sources of the running interpreter
(about 31.5 MB of real code, present on every machine; the default demo corpus).

Record-level problems (malformed JSON, invalid UTF-8, a missing or non-string text field, an
empty document) are written to a :class:`RejectLog` and counted; the read goes on. Whole-input
problems (missing path, a glob that matches nothing) raise :class:`~data_prep.errors.InputError`.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from data_prep.errors import InputError

STDLIB = "stdlib"
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
KNOWN_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


@dataclass(frozen=True)
class Document:
    """One document: its text, the file it came from, and its record number there.

    ``record`` is the 1-based line number for jsonl, the 0-based row for parquet, 0 for a
    whole-file text document.
    """

    text: str
    source: str
    record: int


class RejectLog:
    """Counts rejected records by reason and writes them as jsonl (source, record, reason).

    The file is written to ``path + '.tmp'`` and renamed on :meth:`close`, so a crashed run never
    leaves a rejects file that looks complete. ``path=None`` counts without writing.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.counts: Counter[str] = Counter()
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._tmp, "w", encoding="utf-8")

    @property
    def _tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, source: str, record: int, reason: str) -> None:
        self.counts[reason] += 1
        if self._fh is not None:
            self._fh.write(json.dumps({"source": source, "record": record, "reason": reason}) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            os.replace(self._tmp, self.path)


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, sorted, site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts and p.is_file()]


def _has_known_suffix(path: Path) -> bool:
    return path.name.endswith(KNOWN_SUFFIXES)


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    """Expand paths, globs, directories and ``stdlib`` into a sorted, de-duplicated file list.

    Raises:
        InputError: an input does not exist, a glob or directory matches no readable file, or
            ``inputs`` is empty.
    """
    if not inputs:
        raise InputError("no corpus input given")
    files: list[Path] = []
    for item in inputs:
        if item == STDLIB:
            found = stdlib_files()
        elif any(ch in item for ch in "*?["):
            found = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
        else:
            path = Path(item)
            if not path.exists():
                raise InputError(f"{item}: corpus input does not exist")
            if path.is_dir():
                found = [p for p in sorted(path.rglob("*")) if p.is_file() and _has_known_suffix(p)]
            else:
                found = [path]
        if not found:
            raise InputError(f"{item}: matched no corpus file (known suffixes: {', '.join(KNOWN_SUFFIXES)})")
        files.extend(found)
    unique = list(dict.fromkeys(files))
    for path in unique:
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: corpus file is not readable")
    return unique


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _check_text(text: object, source: str, record: int, rejects: RejectLog, column: str) -> str | None:
    if text is None:
        rejects.add(source, record, f"missing field '{column}'")
        return None
    if not isinstance(text, str):
        rejects.add(source, record, f"field '{column}' is {type(text).__name__}, not a string")
        return None
    if not text.strip():
        rejects.add(source, record, "empty document")
        return None
    return text


def _read_jsonl(path: Path, column: str, rejects: RejectLog) -> Iterator[Document]:
    source = str(path)
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rejects.add(source, lineno, f"invalid UTF-8 at byte {exc.start}")
                continue
            if not line.strip():
                continue  # blank separator lines are not records
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                rejects.add(source, lineno, f"malformed JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(obj, dict):
                rejects.add(source, lineno, f"record is a JSON {type(obj).__name__}, not an object")
                continue
            text = _check_text(obj.get(column), source, lineno, rejects, column)
            if text is not None:
                yield Document(text, source, lineno)


def _read_parquet(path: Path, column: str, rejects: RejectLog, batch_rows: int = 1024) -> Iterator[Document]:
    import pyarrow.parquet as pq

    source = str(path)
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise InputError(f"{path}: text column '{column}' not found (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
        for value in batch.column(0).to_pylist():
            text = _check_text(value, source, row, rejects, column)
            if text is not None:
                yield Document(text, source, row)
            row += 1


def _read_text(path: Path, rejects: RejectLog) -> Iterator[Document]:
    source = str(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        rejects.add(source, 0, f"invalid UTF-8 at byte {exc.start}")
        return
    text = _check_text(text, source, 0, rejects, "text")
    if text is not None:
        yield Document(text, source, 0)


def iter_documents(
    inputs: Sequence[str] | Iterable[Path], text_column: str = "text", rejects: RejectLog | None = None
) -> Iterator[Document]:
    """Yield every good document of ``inputs`` in a deterministic order (sorted files, file order).

    Args:
        inputs: paths, globs, directories or ``stdlib`` (see module docstring).
        text_column: the field holding the text in jsonl and parquet records.
        rejects: where rejected records go; a counting-only log when ``None``.

    Raises:
        InputError: see :func:`resolve_inputs`; also a parquet file without ``text_column``.
    """
    rejects = rejects if rejects is not None else RejectLog()
    for path in resolve_inputs([str(p) for p in inputs]):
        name = path.name
        if name.endswith(JSONL_SUFFIXES):
            yield from _read_jsonl(path, text_column, rejects)
        elif name.endswith(PARQUET_SUFFIXES):
            yield from _read_parquet(path, text_column, rejects)
        else:
            yield from _read_text(path, rejects)


def total_input_bytes(inputs: Sequence[str]) -> int:
    """Sum of the on-disk sizes (bytes) of the resolved input files; drives progress bars and sampling."""
    return sum(p.stat().st_size for p in resolve_inputs(list(inputs)))
