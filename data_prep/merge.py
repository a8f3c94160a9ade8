"""Merge the parts of a prepared folder into one dataset: tails, rejects, ``datasets`` metadata, manifest.

Each prep task leaves ``parts/part-TTTTT.json`` (its completion marker: counts, shards, and the
partial last row of each split, fewer than ``row_tokens`` stream tokens). The merge packs those
tails together in task order (a document boundary where each one starts) into
``<split>/tails-*.arrow``, then drops or pads what remains. Because
``floor(sum(tokens_i) / R) = sum(floor(tokens_i / R)) + floor(sum(tail_i) / R)``, the merged
counts of sequences and of dropped tokens equal those of a single task over the whole corpus.

It runs automatically in the task that finds every marker present (``parts/merge.lock``, created
exclusively, keeps two tasks from merging at once), or by hand: ``lmforge prep merge DIR``, which
ignores the lock (for a merge that crashed).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from data_prep.dedup import HASHES_PREFIX
from data_prep.encode import SPLITS
from data_prep.errors import InputError, UserError
from data_prep.near_dedup import NearDedupParams
from data_prep.pack import Framing, StreamPacker
from data_prep.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, REJECTS_NAME, ShardWriter, write_datasets_metadata
from data_prep.stats import length_bin_edges
from lmforge_common import VERSION, write_json_atomic

log = logging.getLogger(__name__)
PARTS_DIR = "parts"
PART_FORMAT = "lmforge-prep-part"
LOCK_NAME = "merge.lock"
DATASET_DICT = "dataset_dict.json"
TAILS_PREFIX = "tails"


def part_name(task_id: int) -> str:
    return f"part-{task_id:05d}"


def marker_path(out: Path, task_id: int) -> Path:
    return Path(out) / PARTS_DIR / f"{part_name(task_id)}.json"


def task_rejects_path(out: Path, task_id: int) -> Path:
    return Path(out) / PARTS_DIR / f"{part_name(task_id)}.rejects.jsonl"


def task_files(out: Path, task_id: int) -> list[Path]:
    """Every file task ``task_id`` writes (shards, temporaries, rejects, marker)."""
    out = Path(out)
    files = [marker_path(out, task_id), task_rejects_path(out, task_id)]
    for split in SPLITS:
        files.extend((out / split).glob(f"{part_name(task_id)}-*.arrow*"))
    return files


def read_markers(out: Path, plan: str | None = None) -> list[dict]:
    """The task markers of one plan, in task order.

    With ``plan`` (the calling task's), markers of other plans are stale: left by an earlier run
    with another config or corpus, they are ignored here and their files removed by :func:`merge`.
    Without it, markers of several plans are an error.

    Raises:
        UserError: no marker, markers of several plans (``plan=None``), or unfinished tasks (listed).
    """
    paths = sorted((Path(out) / PARTS_DIR).glob("part-*.json"))
    markers = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    plans = {m["plan"] for m in markers}
    if plan is None and len(plans) > 1:
        raise UserError(f"{out}: task markers come from {len(plans)} different configs or corpora; "
                        "rerun the tasks with --overwrite, or remove the stale parts/part-*.json")
    if plan is not None:
        markers = [m for m in markers if m["plan"] == plan]
    if not markers:
        raise UserError(f"{out}: no finished prep task (no {PARTS_DIR}/part-*.json); run lmforge prep first")
    num_tasks = markers[0]["num_tasks"]
    by_id = {m["task_id"]: m for m in markers}
    missing = [i for i in range(num_tasks) if i not in by_id]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise UserError(f"{out}: {len(missing)} of {num_tasks} tasks not finished (task ids {shown}); run them, then merge")
    return [by_id[i] for i in range(num_tasks)]


def _remove_stale_parts(out: Path, plan: str) -> None:
    for path in sorted((out / PARTS_DIR).glob("part-*.json")):
        marker = json.loads(path.read_text(encoding="utf-8"))
        if marker["plan"] != plan:
            log.warning("prep: removing part %d of an earlier run with another config or corpus", marker["task_id"])
            for stale in task_files(out, marker["task_id"]):
                stale.unlink(missing_ok=True)


def merge_if_complete(out: Path, plan: str) -> dict | None:
    """Merge when every task of ``plan`` has finished and no other task is merging; else ``None``."""
    out = Path(out)
    try:
        read_markers(out, plan)
    except UserError as exc:
        log.info("prep: not merging yet: %s", exc)
        return None
    lock = out / PARTS_DIR / LOCK_NAME
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        log.info("prep: another task is merging (%s exists); leaving it to that task "
                 "(if none is running, a merge crashed: run lmforge prep merge %s)", lock, out)
        return None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        return merge(out, plan)
    finally:
        lock.unlink(missing_ok=True)


def _stitch_tails(out: Path, markers: list[dict], split: str, framing: Framing, dtype: np.dtype, per_shard: int) -> dict:
    packer = StreamPacker(framing.row_tokens, dtype)
    writer = ShardWriter(out, split, framing.seq_len, dtype, TAILS_PREFIX, per_shard)
    for m in markers:
        part = m["splits"][split]
        rows, offsets, starts = packer.add_segments(np.asarray(part["tail_tokens"], dtype=dtype),
                                                    np.asarray(part["tail_starts"], dtype=np.int64), boundary_at_start=True)
        writer.add(framing.frame(rows, offsets, starts, dtype))
    left, left_starts = packer.take_tail()
    pad_row = bool(len(left)) and markers[0]["config"]["tail"] == "pad"
    padded = dropped = 0
    if pad_row:
        row = framing.frame_padded(left, left_starts, dtype)
        writer.add(row)
        padded = framing.seq_len - int(row.num_tokens[0])
    else:
        dropped = len(left)
    return {"shards": writer.close(), "rows": packer.rows + int(pad_row), "tokens_dropped": dropped, "tokens_padded": padded}


def _merge_rejects(out: Path, markers: list[dict]) -> None:
    tmp = out / (REJECTS_NAME + ".tmp")
    with open(tmp, "wb") as dst:
        for m in markers:
            path = task_rejects_path(out, m["task_id"])
            if path.exists():
                with open(path, "rb") as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
    os.replace(tmp, out / REJECTS_NAME)


def _remove_unreferenced_shards(out: Path, shards: dict[str, list[dict]]) -> None:
    for split, listed in shards.items():
        keep = {s["path"] for s in listed}
        for path in (out / split).glob("*.arrow*"):
            if path.relative_to(out).as_posix() not in keep and path.name.startswith(("part-", TAILS_PREFIX, "shard-")):
                path.unlink()


def _framing(marker: dict) -> tuple[Framing, np.dtype]:
    """The sequence framing and token dtype a task marker records."""
    fr = marker["framing"]
    dtype = np.dtype(marker["token_dtype"])
    return Framing(marker["config"]["seq_len"], tuple(fr["sequence_prefix_ids"]), tuple(fr["sequence_suffix_ids"]),
                   fr["pad_token_id"]), dtype


def _count_documents(out: Path, markers: list[dict]) -> int:
    """Usable documents over every task and split; raises :class:`InputError` when there is none."""
    documents = sum(m["splits"][s]["documents"] for m in markers for s in SPLITS)
    if documents == 0:
        rejects = sum(m["rejects"] for m in markers)
        raise InputError(f"{', '.join(map(str, markers[0]['config']['inputs']))}: empty corpus, no usable document "
                         f"({rejects} rejected, see {out / REJECTS_NAME})")
    return documents


def _merge_split(out: Path, markers: list[dict], split: str, framing: Framing, dtype: np.dtype) -> dict:
    """One split's manifest entry: the tasks' counts and shards plus the stitched tails."""
    tails = _stitch_tails(out, markers, split, framing, dtype, markers[0]["config"]["sequences_per_shard"])
    parts = [m["splits"][split] for m in markers]
    hist = np.sum([np.asarray(p["doc_length_counts"] or [0] * len(length_bin_edges()), dtype=np.int64) for p in parts], axis=0)
    return {
        "documents": sum(p["documents"] for p in parts), "tokens": sum(p["tokens"] for p in parts),
        "sequences": sum(p["rows"] for p in parts) + tails["rows"],
        "tokens_dropped": tails["tokens_dropped"], "tokens_padded": tails["tokens_padded"],
        "shards": [sh for p in parts for sh in p["shards"]] + tails["shards"], "doc_length_counts": hist.tolist(),
        "text_bytes": sum(p.get("text_bytes", 0) for p in parts),
    }


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Per-key sums of count dicts, keys in order of first appearance."""
    total: dict[str, int] = {}
    for c in counts:
        for key, n in c.items():
            total[key] = total.get(key, 0) + n
    return total


def _near_dedup_fields(cfg: dict, markers: list[dict]) -> dict:
    """The manifest's near-dedup record and near duplicates per source; empty when near dedup is off."""
    if not cfg.get("near_dedup"):
        return {}
    near = _sum_counts(m.get("near_duplicates_by_source", {}) for m in markers)
    params = NearDedupParams(cfg["near_dedup_ngrams"], cfg["near_dedup_buckets"], cfg["near_dedup_hashes_per_bucket"])
    return {"near_dedup": {**params.record(sum(near.values())), "scope": "per task" if len(markers) > 1 else "whole corpus"},
            "near_duplicates_by_source": near}


def _manifest(markers: list[dict], framing: Framing, dtype: np.dtype, splits: dict[str, dict], documents: int,
              start: float) -> dict:
    """The dataset manifest from the task markers and the merged splits (``start``: the merge's perf_counter)."""
    first, cfg = markers[0], markers[0]["config"]
    fr = first["framing"]
    duplicates = _sum_counts(m.get("duplicates_by_source", {}) for m in markers)
    sequences = sum(v["sequences"] for v in splits.values())
    sources = first["sources"]
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "lmforge_version": VERSION,
        "created_unix_s": round(time.time(), 3), "plan": first["plan"],
        "objective": cfg["objective"], "seq_len": cfg["seq_len"], "token_dtype": dtype.name, "tail": cfg["tail"],
        "pad_token_id": framing.pad_id, **{k: fr[k] for k in ("document_prefix_ids", "document_suffix_ids",
                                                              "sequence_prefix_ids", "sequence_suffix_ids")},
        "tokenizer": first["tokenizer"],
        "sources": sources if len(sources) <= 64 else {"files": len(sources), "first": sources[0], "last": sources[-1]},
        "config": cfg,
        "counts": {
            "documents": documents, "tokens": sum(v["tokens"] for v in splits.values()),
            "tokens_framing": sequences * (len(framing.prefix) + len(framing.suffix)), "sequences": sequences,
            "rejects": sum(m["rejects"] for m in markers), "duplicates": sum(duplicates.values()),
            "tokens_dropped": sum(v["tokens_dropped"] for v in splits.values()),
            "tokens_padded": sum(v["tokens_padded"] for v in splits.values()),
        },
        "rejects_by_reason": _sum_counts(m["rejects_by_reason"] for m in markers),
        "duplicates_by_source": duplicates,
        **_near_dedup_fields(cfg, markers),
        "doc_length_bin_edges_tokens": length_bin_edges().tolist(),
        "splits": splits,
        "tasks": {"num_tasks": len(markers), "input_bytes": sum(m["input_bytes"] for m in markers),
                  "elapsed_s": [m["elapsed_s"] for m in markers], "merge_elapsed_s": round(time.perf_counter() - start, 3)},
    }


def merge(out: str | Path, plan: str | None = None) -> dict:
    """Merge every task's part in ``out``; returns the manifest written last to ``out/manifest.json``.

    ``plan`` restricts the merge to that plan's markers and removes the parts of other plans.

    Raises:
        UserError: unfinished tasks or markers of several plans (see :func:`read_markers`).
        InputError: no usable document in the whole corpus (``rejects.jsonl`` is written, the
            manifest is not).
    """
    out = Path(out)
    start = time.perf_counter()
    markers = read_markers(out, plan)
    if plan is not None:
        _remove_stale_parts(out, plan)
    framing, dtype = _framing(markers[0])
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    _merge_rejects(out, markers)
    documents = _count_documents(out, markers)
    splits = {s: _merge_split(out, markers, s, framing, dtype) for s in SPLITS}
    shards = {s: v["shards"] for s, v in splits.items()}
    _remove_unreferenced_shards(out, shards)
    write_datasets_metadata(out, shards)
    manifest = _manifest(markers, framing, dtype, splits, documents, start)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    for path in (out / PARTS_DIR).glob(f"{HASHES_PREFIX}-*.npy*"):  # the dedup hash pass's: no task needs them now
        path.unlink(missing_ok=True)
    c = manifest["counts"]
    log.info("prep: %d documents, %d tokens, %d sequences of %d tokens, %d rejects from %d task(s) -> %s",
             c["documents"], c["tokens"], c["sequences"], manifest["seq_len"], c["rejects"], len(markers), out)
    return manifest
