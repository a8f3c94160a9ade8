"""The faults ``bench/fault_matrix.py`` plants on disk: damaged checkpoints and rotted shards (and their repair).

Each flips or truncates real bytes of a real run's files, as a flaky file system or a partial copy does; the
trainer's checksums (``pretrain.integrity``, ``data.verify_checksums``) must catch every one.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from data_prep.shards import MANIFEST_NAME
from pretrain.checkpoint import STATE_FILE, complete_checkpoints, read_state
from pretrain.integrity import DIGESTS_KEY


def flip_byte(path: Path, offset: int, mask: int) -> bytes:
    """XOR the byte at ``offset`` of ``path`` with ``mask`` in place; returns the byte it held."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ mask]))
    return byte


def damage(run_dir: Path, rng: random.Random) -> list[tuple[int, str]]:
    """Damage the 3 newest checkpoints (truncate a file to half / flip one byte / truncate the state file);
    returns ``(step, what)`` of each."""
    found = complete_checkpoints(run_dir / "checkpoints")[-3:]
    out = []
    for (step, path), how in zip(reversed(found), ("truncated", "flipped", "state")):
        record = read_state(path)[DIGESTS_KEY]
        victim = max(record, key=lambda n: record[n]["bytes"]) if how != "flipped" else rng.choice(sorted(record))
        if how == "state":
            os.truncate(path / STATE_FILE, (path / STATE_FILE).stat().st_size // 2)
            victim = STATE_FILE
        elif how == "truncated":
            os.truncate(path / victim, record[victim]["bytes"] // 2)
        else:
            flip_byte(path / victim, rng.randrange(record[victim]["bytes"]), 0xFF)
        out.append((step, f"{how} {victim}"))
    return out


def rot_shards(data: Path, rng: random.Random) -> dict[Path, tuple[int, bytes]]:
    """Flip one byte (drawn offset) in every train shard of ``data``; returns what to restore."""
    records = json.loads((data / MANIFEST_NAME).read_text())["splits"]["train"]["shards"]
    saved = {}
    for record in records:
        path = data / record["path"]
        offset = rng.randrange(record["bytes"] // 4, record["bytes"])  # past the header, in the token ids
        saved[path] = (offset, flip_byte(path, offset, 0x01))
    return saved


def restore(saved: dict[Path, tuple[int, bytes]]) -> None:
    """Put back the bytes :func:`rot_shards` flipped."""
    for path, (offset, byte) in saved.items():
        with open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write(byte)


def wait_for(path: Path, timeout_s: float = 600) -> bool:
    """Whether ``path`` exists within ``timeout_s`` seconds (polled every second)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(1)
    return path.exists()
