"""Corpus inputs: resolve paths, globs, folders and Hub names into sources, and split them into tasks.

An input is one of:

- a file: jsonl (``.jsonl``/``.json``, plain, ``.gz`` or ``.zst``), parquet (``.parquet``), Arrow
  (``.arrow``: IPC stream, as ``datasets`` writes, or IPC file), or plain text (any other suffix);
- a folder written by ``datasets.save_to_disk`` (``state.json`` inside; a ``DatasetDict`` folder
  with ``dataset_dict.json`` contributes every split it lists, in that order);
- any other folder: every file with a known suffix below it, sorted; ``save_to_disk`` folders
  found on the way are read as datasets (their listed Arrow files only);
- a glob (``corpus/**/*.jsonl.zst``);
- ``stdlib``: the running interpreter's standard library sources (about 31.5 MB of real code);
- ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face Hub dataset (or anything ``datasets.load_dataset``
  accepts as a path, such as a local folder of data files), read with ``streaming=True`` so
  nothing is downloaded in full or cached as Arrow. ``SPLIT`` defaults to ``train``.

A :class:`Segment` is the part of one source that one task reads: a byte range for splittable
files (plain jsonl, and plain text in per-line mode; a line belongs to the range holding its first
byte), a list of row groups for parquet, the whole file otherwise, and every ``N``-th shard or
example (``datasets.distributed.split_dataset_by_node``) for a Hub dataset.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from data_prep.errors import InputError

STDLIB = "stdlib"
HUB_PREFIX = "hf:"
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
KNOWN_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES + TEXT_SUFFIXES
TEXT_MODES = ("file", "line")
DATASET_STATE = "state.json"
DATASET_DICT = "dataset_dict.json"


@dataclass(frozen=True)
class HubSpec:
    """A ``hf:NAME[:CONFIG][@SPLIT]`` input."""

    name: str
    config: str | None
    split: str

    @classmethod
    def parse(cls, item: str) -> HubSpec:
        rest = item[len(HUB_PREFIX):]
        rest, _, split = rest.rpartition("@") if "@" in rest else (rest, "", "train")
        name, _, config = rest.partition(":")
        if not name:
            raise InputError(f"{item}: Hub input needs a dataset name (hf:NAME[:CONFIG][@SPLIT])")
        return cls(name, config or None, split or "train")


@dataclass(frozen=True)
class Source:
    """One readable input: a file, or a Hub dataset.

    ``kind`` is ``jsonl``, ``parquet``, ``arrow``, ``text`` or ``hub``; ``size_bytes`` is the
    on-disk size (0 for a Hub dataset, whose size is unknown before reading).
    """

    kind: str
    path: str
    size_bytes: int = 0
    hub: HubSpec | None = None

    @property
    def compressed(self) -> bool:
        return self.path.endswith((".gz", ".zst"))

    def splittable(self, text_mode: str) -> bool:
        """True when byte ranges of the file can be read independently (line-aligned)."""
        if self.compressed:
            return False
        return self.kind == "jsonl" or (self.kind == "text" and text_mode == "line")


@dataclass(frozen=True)
class Segment:
    """The part of ``source`` one task reads (see module docstring).

    ``start``/``end`` are bytes for splittable files (``end`` exclusive); ``row_groups`` lists the
    parquet row groups; ``shard_of`` is ``(task_id, num_tasks)`` for a Hub dataset split by node.
    """

    source: Source
    start: int = 0
    end: int | None = None
    row_groups: tuple[int, ...] | None = None
    shard_of: tuple[int, int] | None = None
    nbytes: int = 0
    """On-disk bytes this segment covers (estimated for parquet row groups); drives progress."""


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, sorted, site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts and p.is_file()]


def _kind_of(path: Path) -> str:
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(ARROW_SUFFIXES):
        return "arrow"
    return "text"


def _file_source(path: Path) -> Source:
    return Source(_kind_of(path), str(path), path.stat().st_size)


def _dataset_folder_files(folder: Path) -> list[Path]:
    """Arrow files of a ``save_to_disk`` folder (``Dataset`` or ``DatasetDict``), in their listed order."""
    if (folder / DATASET_DICT).is_file():
        splits = json.loads((folder / DATASET_DICT).read_text(encoding="utf-8")).get("splits", [])
        return [f for split in splits for f in _dataset_folder_files(folder / split)]
    state_path = folder / DATASET_STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{state_path}: not a readable datasets state file ({exc})") from exc
    for f in files:
        if not f.is_file():
            raise InputError(f"{f}: listed in {state_path} but missing")
    return files


def _is_dataset_folder(folder: Path) -> bool:
    return (folder / DATASET_STATE).is_file() or (folder / DATASET_DICT).is_file()


def _walk_folder(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        if _is_dataset_folder(root_path):
            found.extend(_dataset_folder_files(root_path))
            dirs[:] = []
            continue
        dirs.sort()
        found.extend(root_path / f for f in sorted(files) if f.endswith(KNOWN_SUFFIXES))
    return found


def resolve_sources(inputs: Sequence[str]) -> list[Source]:
    """Expand ``inputs`` (see module docstring) into de-duplicated sources, in input order.

    Raises:
        InputError: an input does not exist, a glob or folder matches no corpus file, a file is
            not readable, or ``inputs`` is empty.
    """
    if not inputs:
        raise InputError("no corpus input given")
    sources: list[Source] = []
    for item in map(str, inputs):
        if item.startswith(HUB_PREFIX):
            spec = HubSpec.parse(item)
            sources.append(Source("hub", item, 0, spec))
            continue
        if item == STDLIB:
            found = stdlib_files()
        elif any(ch in item for ch in "*?["):
            found = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
        else:
            path = Path(item)
            if not path.exists():
                raise InputError(f"{item}: corpus input does not exist")
            found = _walk_folder(path) if path.is_dir() else [path]
        if not found:
            raise InputError(f"{item}: matched no corpus file (known suffixes: {', '.join(KNOWN_SUFFIXES)})")
        sources.extend(_file_source(p) for p in found)
    unique = list({s.path: s for s in sources}.values())
    for s in unique:
        if s.kind != "hub" and not os.access(s.path, os.R_OK):
            raise InputError(f"{s.path}: corpus file is not readable")
    return unique


def _parquet_row_groups(path: str) -> list[tuple[int, int]]:
    """``(first byte, compressed bytes)`` of each row group of a parquet file."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for corrupt files
        raise InputError(f"{path}: unreadable parquet file ({exc})") from exc
    groups = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        col = rg.column(0)
        starts = [o for o in (col.dictionary_page_offset, col.data_page_offset) if o is not None]
        groups.append((min(starts) if starts else 0, sum(rg.column(j).total_compressed_size for j in range(rg.num_columns))))
    return groups


def plan_segments(sources: Sequence[Source], task_id: int, num_tasks: int, text_mode: str) -> list[Segment]:
    """The segments task ``task_id`` of ``num_tasks`` reads, in corpus order.

    The local sources, laid end to end, are cut into ``num_tasks`` equal byte ranges; task ``i``
    owns bytes ``[i * T // N, (i + 1) * T // N)`` of the ``T`` total. A splittable file is cut at
    the range boundaries (line-aligned when read); a parquet row group, or any other whole file,
    goes to the task whose range holds its first byte. Hub datasets are split by node in every task.
    Every record is therefore read by exactly one task, and reading all tasks' segments in task
    order reads the corpus in the single-task order (Hub datasets aside).
    """
    if not 0 <= task_id < num_tasks:
        raise InputError(f"task id {task_id} is outside [0, {num_tasks})")
    total = sum(s.size_bytes for s in sources)
    lo, hi = task_id * total // num_tasks, (task_id + 1) * total // num_tasks
    last = task_id == num_tasks - 1

    def owns(offset: int) -> bool:
        return lo <= offset < hi or (last and offset >= hi)

    segments: list[Segment] = []
    offset = 0
    for s in sources:
        if s.kind == "hub":
            segments.append(Segment(s, shard_of=(task_id, num_tasks) if num_tasks > 1 else None))
            continue
        if s.splittable(text_mode) and s.size_bytes > 0:
            a, b = max(lo, offset) - offset, (hi if not last else offset + s.size_bytes) - offset
            b = min(b, s.size_bytes)
            if a < b:
                segments.append(Segment(s, a, b, nbytes=b - a))
        elif s.kind == "parquet" and num_tasks > 1:
            mine = [(i, size) for i, (off, size) in enumerate(_parquet_row_groups(s.path)) if owns(offset + off)]
            if mine:
                segments.append(Segment(s, row_groups=tuple(i for i, _ in mine), nbytes=sum(size for _, size in mine)))
        elif owns(offset):
            segments.append(Segment(s, nbytes=s.size_bytes))
        offset += s.size_bytes
    return segments
