"""Exact deduplication at prep: a document whose normalised text already occurred earlier in corpus order is dropped.

Normalisation (:func:`normalise`): Unicode NFC, ``\\r\\n`` and ``\\r`` line ends as ``\\n``, leading
and trailing whitespace stripped; so copies that differ only by encoding artefacts count as
duplicates, and nothing else does. The key is a 64-bit blake2b of the UTF-8 bytes: two different
texts collide with probability about ``n**2 / 2**65`` over ``n`` documents (one in 3,700 at 100M
documents), and a collision drops the later one.

Corpus order is the order of the tasks' segments (:func:`data_prep.sources.plan_segments`: task
order is the single-task order, Hub datasets aside), so the first occurrence is the same document
whatever the number of tasks and workers. Before tokenizing, task ``t`` hashes its own documents
(the hash pass: parse only, on the worker pool) and saves them as ``parts/hashes-TTTTT-PLAN.npy``,
then loads the saved hashes of tasks ``0 .. t-1``, hashing itself any not saved yet (there is no
wait on other tasks, so a throttled Slurm array cannot deadlock; at worst a task hashes the corpus
before its share). Hashes cost 8 bytes per document of the corpus before the task's end, held in memory.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep.encode import map_blocks
from data_prep.reader import parse_block, read_blocks
from data_prep.sources import Source, plan_segments

HASHES_PREFIX = "hashes"
"""``parts/hashes-TTTTT-PLAN.npy``: task ``TTTTT``'s document hashes (uint64, corpus order) under plan ``PLAN``."""


def normalise(text: str) -> str:
    """The text duplicates are compared by: NFC, ``\\n`` line ends, no leading or trailing whitespace."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """``(len(texts),)`` uint64: blake2b-64 of each normalised text's UTF-8 bytes."""
    digests = b"".join(hashlib.blake2b(normalise(t).encode("utf-8", "surrogatepass"), digest_size=8).digest()
                       for t in texts)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _block_hashes(block, text_column: str) -> tuple[str, np.ndarray]:
    """``(source, hashes of the block's documents)``; runs in a worker."""
    return block.source, text_hashes(parse_block(block, text_column).texts)


def _hashes_path(parts_dir: Path, task_id: int, plan: str) -> Path:
    return parts_dir / f"{HASHES_PREFIX}-{task_id:05d}-{plan[:16]}.npy"


def _hash_task(sources: list[Source], task_id: int, num_tasks: int, cfg, workers: int) -> list[tuple[str, np.ndarray]]:
    """``(source, hashes)`` per block of task ``task_id``'s segments, in corpus order."""
    segments = plan_segments(sources, task_id, num_tasks, cfg.text_mode)
    blocks = (b for seg in segments for b in read_blocks(seg, cfg.text_column, cfg.text_mode, cfg.block_bytes))
    return list(map_blocks(partial(_block_hashes, text_column=cfg.text_column), blocks, workers))


def _save(path: Path, hashes: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, hashes)
    os.replace(tmp, path)


def keep_masks(sources: list[Source], cfg, plan: str, parts_dir: Path,
               workers: int) -> tuple[list[np.ndarray], dict[str, int]]:
    """Per block of this task (``cfg.task_id``), in read order: a bool mask of the documents to keep; and the
    documents dropped as duplicates per source.

    ``cfg`` is the :class:`~data_prep.prep.PrepConfig`; blocks are cut as :func:`data_prep.reader.read_blocks`
    cuts them with ``cfg.block_bytes``, so the masks line up with the tokenizing pass's blocks.
    """
    parts_dir.mkdir(parents=True, exist_ok=True)
    own = _hash_task(sources, cfg.task_id, cfg.num_tasks, cfg, workers)
    flat = np.concatenate([h for _, h in own]) if own else np.empty(0, dtype=np.uint64)
    _save(_hashes_path(parts_dir, cfg.task_id, plan), flat)
    earlier = []
    for t in range(cfg.task_id):
        path = _hashes_path(parts_dir, t, plan)
        if path.is_file():
            earlier.append(np.load(path))
        else:
            hashes = [h for _, h in _hash_task(sources, t, cfg.num_tasks, cfg, workers)]
            earlier.append(np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64))
            _save(path, earlier[-1])
    seen = np.unique(np.concatenate(earlier)) if earlier else np.empty(0, dtype=np.uint64)
    first = np.zeros(len(flat), dtype=bool)
    first[np.unique(flat, return_index=True)[1]] = True
    keep = first & ~np.isin(flat, seen, assume_unique=False)
    masks: list[np.ndarray] = []
    dropped: Counter[str] = Counter()
    pos = 0
    for source, h in own:
        masks.append(keep[pos:pos + len(h)])
        dropped[source] += int(len(h) - masks[-1].sum())
        pos += len(h)
    return masks, {s: n for s, n in dropped.items() if n}
