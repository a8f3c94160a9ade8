"""Checkpoints that verify themselves: the size and checksum of every file, recorded at save, checked at load.

Hash: XXH3-128 from the ``xxhash`` library (Collet; a non-cryptographic hash that runs at memory
speed, several GB/s per core; it detects truncation, bit rot and partial copies, not tampering).

At save, after every rank's files are on disk, the files of the checkpoint are split among the ranks by
size (:func:`share_of`, the same split on every rank without communication); each rank hashes its share
while the pages are still cached and writes ``digests-rank{r}.json``; rank 0 merges them into the
checkpoint's state file, which is written last. At resume and before an export, :func:`verify` checks a
checkpoint against that record: ``size`` compares byte counts only (a stat per file), ``checksum``
also re-reads and hashes every byte, ``off`` trusts it. A checkpoint saved before digests existed
verifies as ``unrecorded`` (accepted, with a log line).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from lmforge_common import UserError, write_json_atomic

VerifyMode = Literal["off", "size", "checksum"]
HASH_NAME = "xxh3_128"
DIGESTS_KEY = "files"
"""Key of the ``{relative path: {"bytes": n, "xxh3_128": hex}}`` record in the checkpoint's state file."""
DIGEST_FILE_PREFIX = "digests-rank"
CHUNK_BYTES = 8 << 20


class CheckpointIntegrityError(UserError):
    """No checkpoint matches the sizes and digests recorded when it was saved (the message names the bad files)."""


class StateFileError(CheckpointIntegrityError):
    """A checkpoint's ``lmforge_state.json`` is unreadable or does not match its own recorded digest."""


def hash_file(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """XXH3-128 hex digest of a file, read in ``chunk_bytes`` pieces (bytes)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def checkpoint_files(root: str | Path, exclude: Iterable[str] = ()) -> list[str]:
    """Every regular file under ``root`` as a sorted relative path, except names in ``exclude`` and digest files."""
    root = Path(root)
    skip = set(exclude)
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in skip and not name.startswith(DIGEST_FILE_PREFIX):
                out.append(rel)
    return sorted(out)


def share_of(root: str | Path, files: list[str], rank: int, world_size: int) -> list[str]:
    """The files rank ``rank`` hashes: largest first, each to the rank with the fewest bytes so far (ties by rank)."""
    root = Path(root)
    return _split([(os.path.getsize(root / f), f) for f in files], rank, world_size)


def record_share(record: dict[str, dict], rank: int, world_size: int) -> dict[str, dict]:
    """The part of a checkpoint's ``record`` rank ``rank`` verifies, split by recorded bytes as :func:`share_of`."""
    mine = _split([(want["bytes"], name) for name, want in record.items()], rank, world_size)
    return {name: record[name] for name in mine}


def _split(sized: list[tuple[int, str]], rank: int, world_size: int) -> list[str]:
    sizes = sorted(sized, key=lambda x: (-x[0], x[1]))
    load = [0] * world_size
    mine = []
    for size, name in sizes:
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += size
        if r == rank:
            mine.append(name)
    return sorted(mine)


def digest(root: str | Path, files: Iterable[str]) -> dict[str, dict]:
    """``{relative path: {"bytes": size, "xxh3_128": hex}}`` of ``files`` under ``root``."""
    root = Path(root)
    return {f: {"bytes": os.path.getsize(root / f), HASH_NAME: hash_file(root / f)} for f in files}


def write_rank_digests(root: str | Path, rank: int, world_size: int, exclude: Iterable[str] = ()) -> None:
    """Hash this rank's share of the checkpoint files under ``root`` into ``digests-rank{rank}.json``."""
    files = share_of(root, checkpoint_files(root, exclude), rank, world_size)
    write_json_atomic(Path(root) / f"{DIGEST_FILE_PREFIX}{rank}.json", digest(root, files))


def merge_rank_digests(root: str | Path, world_size: int) -> dict[str, dict]:
    """Rank 0: every rank's digests as one record, the per-rank files removed.

    Raises:
        FileNotFoundError: a rank's digest file is missing (it did not finish its share).
    """
    root = Path(root)
    merged: dict[str, dict] = {}
    for rank in range(world_size):
        path = root / f"{DIGEST_FILE_PREFIX}{rank}.json"
        merged.update(json.loads(path.read_text(encoding="utf-8")))
    for rank in range(world_size):
        (root / f"{DIGEST_FILE_PREFIX}{rank}.json").unlink()
    return dict(sorted(merged.items()))


@dataclass
class Verdict:
    """The result of checking one checkpoint against its record."""

    path: Path
    status: Literal["ok", "bad", "unrecorded", "unchecked"]
    problems: list[str] = field(default_factory=list)
    """One entry per bad file: ``FILE: N bytes, recorded M`` or ``FILE: checksum X, recorded Y``."""
    bytes_checked: int = 0
    seconds: float = 0.0

    @property
    def usable(self) -> bool:
        return self.status != "bad"

    def line(self) -> str:
        if self.status == "bad":
            return f"{self.path}: BAD: " + "; ".join(self.problems)
        return f"{self.path}: {self.status.upper() if self.status == 'ok' else self.status}"


def verify(path: str | Path, record: dict[str, dict] | None, mode: VerifyMode = "checksum") -> Verdict:
    """Check the files of checkpoint ``path`` against ``record`` (see the module docstring)."""
    import time

    path = Path(path)
    if mode == "off":
        return Verdict(path, "unchecked")
    if not record:
        return Verdict(path, "unrecorded")
    start, checked, problems = time.perf_counter(), 0, []
    for name, want in record.items():
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if size != want["bytes"]:
            problems.append(f"{name}: {size} bytes, recorded {want['bytes']}")
            continue
        if mode == "checksum":
            got = hash_file(file)
            checked += size
            if got != want[HASH_NAME]:
                problems.append(f"{name}: {HASH_NAME} {got}, recorded {want[HASH_NAME]}")
    return Verdict(path, "bad" if problems else "ok", problems, checked, time.perf_counter() - start)
