"""The on-disk format of a prepared dataset, its writer and its memory-mapped reader.

Layout of a prepared folder ``DIR``::

    DIR/manifest.json                    written last (temp + rename): no manifest, not complete
    DIR/rejects.jsonl                    rejected records, one JSON object per line (source, record, reason)
    DIR/<split>/part-TTTTT-SSSSS.arrow   shard SSSSS of task TTTTT: Arrow IPC *stream* files
    DIR/<split>/tails-SSSSS.arrow        the tasks' partial last rows, packed together by the merge
    DIR/<split>/state.json, dataset_info.json, DIR/dataset_dict.json
                                         so that ``datasets.load_from_disk(DIR)`` opens it
    DIR/parts/part-TTTTT.json            task TTTTT's completion marker (counts, shards, tail)

Each shard row is one packed sequence:

- ``input_ids``: ``fixed_size_list<uint16|uint32>[seq_len]``; uint16 when the vocabulary fits
  in 65536 ids, else uint32.
- ``document_starts``: ``list<int32>``, the positions in the sequence where a document (or a
  document fragment that does not continue the preceding token) begins. Position 0 is listed only
  when a document starts exactly there; otherwise the sequence opens with the continuation of a
  document begun in the previous sequence.
- ``num_tokens``: ``int32``, how many leading positions are real tokens; the rest is padding
  (``manifest["pad_token_id"]``), present only in the last sequence of a split prepared with
  ``tail='pad'``. Mask positions ``t >= num_tokens`` out of the loss (and of attention).

The manifest's ``objective`` is ``clm`` (documents end with EOS, BOS first where the tokenizer has
a distinct one) or ``mlm`` (each sequence framed by the tokenizer's post-processor template,
``sequence_prefix_ids`` / ``sequence_suffix_ids``, e.g. ``[CLS] ... [SEP]``).
Format version 1 (no ``num_tokens`` column) is still read.

Open with ``datasets``::

    datasets.load_from_disk("DIR")          # a DatasetDict with the splits
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.encode import TRAIN
from data_prep.errors import InputError, UserError
from data_prep.pack import Rows
from lmforge_common import write_json_atomic

FORMAT_NAME = "lmforge-packed-sequences"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
UINT16_MAX_VOCAB = 2**16


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of a ``vocab_size``-token vocabulary fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_MAX_VOCAB else np.dtype(np.uint32)


def shard_schema(seq_len: int, dtype: np.dtype) -> pa.Schema:
    """Arrow schema of a shard holding ``seq_len``-token sequences of ``dtype`` ids."""
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.from_numpy_dtype(dtype), seq_len)),
            pa.field("document_starts", pa.list_(pa.int32())),
            pa.field("num_tokens", pa.int32()),
        ]
    )


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in ``chunk_bytes`` pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _arrow(values: np.ndarray, dtype: type | np.dtype) -> pa.Array:
    """A null-free Arrow array of ``values`` (1-D) as ``dtype``, built from its buffer: the same array as
    ``pa.array(values)``, without the pandas import (0.5 s) that ``pa.array`` makes on first use."""
    flat = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(pa.from_numpy_dtype(flat.dtype), len(flat), [None, pa.py_buffer(flat)])


class ShardWriter:
    """Writes framed sequences of one split into shards of at most ``sequences_per_shard`` rows.

    Shards are named ``<split>/<name_prefix>-SSSSS.arrow``, written to ``*.arrow.tmp`` and renamed
    when full, with their sha256 and size in bytes recorded for the manifest. Rows are re-batched
    into record batches of exactly ``batch_rows`` (the last of a shard may be shorter), so the
    bytes written depend only on the rows, never on how callers grouped them.
    """

    def __init__(self, out_dir: str | Path, split: str, seq_len: int, dtype: np.dtype, name_prefix: str,
                 sequences_per_shard: int = 65536, batch_rows: int = 1024):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.seq_len, self.dtype, self.name_prefix = split, seq_len, np.dtype(dtype), name_prefix
        self.sequences_per_shard, self.batch_rows = sequences_per_shard, min(batch_rows, sequences_per_shard)
        self.schema = shard_schema(seq_len, self.dtype)
        self.shards: list[dict] = []
        self._pending: list[Rows] = []
        self._pending_rows = 0
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._rows_in_shard = 0

    def add(self, rows: Rows) -> None:
        """Append framed rows (``rows.ids`` is ``(n, seq_len)``)."""
        if rows.ids.ndim != 2 or rows.ids.shape[1] != self.seq_len:
            raise ValueError(f"rows have shape {rows.ids.shape}, expected (n, {self.seq_len})")
        if not len(rows):
            return
        self._pending.append(rows)
        self._pending_rows += len(rows)
        while self._pending_rows >= self._next_batch_rows():
            self._write(self._next_batch_rows())

    def _next_batch_rows(self) -> int:
        return min(self.batch_rows, self.sequences_per_shard - self._rows_in_shard)

    def _shard_path(self, index: int) -> Path:
        return self.dir / f"{self.name_prefix}-{index:05d}.arrow"

    def _write(self, n: int) -> None:
        rows = Rows.concat(self._pending)
        batch, rest = rows.slice(0, n), rows.slice(n, len(rows))
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
        if self._writer is None:
            tmp = self._shard_path(len(self.shards)).with_suffix(".arrow.tmp")
            self._writer = pa.ipc.new_stream(str(tmp), self.schema)
        ids = pa.FixedSizeListArray.from_arrays(_arrow(batch.ids.reshape(-1), self.dtype), self.seq_len)
        starts = pa.ListArray.from_arrays(_arrow(batch.offsets, np.int32), _arrow(batch.starts, np.int32))
        num = _arrow(batch.num_tokens, np.int32)
        self._writer.write_batch(pa.record_batch([ids, starts, num], schema=self.schema))
        self._rows_in_shard += n
        if self._rows_in_shard >= self.sequences_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        final = self._shard_path(len(self.shards))
        os.replace(final.with_suffix(".arrow.tmp"), final)
        self.shards.append({
            "path": final.relative_to(self.out_dir).as_posix(),
            "sequences": self._rows_in_shard,
            "bytes": final.stat().st_size,
            "sha256": sha256_file(final),
        })
        self._rows_in_shard = 0

    def close(self) -> list[dict]:
        """Flush and close; returns the shard records (path, sequences, bytes, sha256)."""
        while self._pending_rows:
            self._write(min(self._pending_rows, self._next_batch_rows()))
        self._close_shard()
        return self.shards


def write_datasets_metadata(out_dir: str | Path, shards_by_split: dict[str, list[dict]]) -> None:
    """Write the ``state.json`` / ``dataset_info.json`` / ``dataset_dict.json`` files of ``datasets.save_to_disk``.

    Only splits holding at least one shard are listed. ``datasets`` infers the features from the
    Arrow schema.
    """
    out = Path(out_dir)
    listed = []
    for split, shards in shards_by_split.items():
        if not shards:
            continue
        listed.append(split)
        digest = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        state: dict[str, object] = {"_data_files": [{"filename": Path(s["path"]).name} for s in shards], "_fingerprint": digest,
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": split}
        write_json_atomic(out / split / "state.json", state)
        write_json_atomic(out / split / "dataset_info.json", {"description": "lmforge packed sequences; see manifest.json"})
    write_json_atomic(out / "dataset_dict.json", {"splits": listed})


def read_manifest(data_dir: str | Path) -> dict:
    """Load and check ``data_dir/manifest.json``.

    Raises:
        InputError: no manifest (not prepared, or prep did not finish), or an unknown format.
    """
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{data_dir}: no {MANIFEST_NAME}; not a prepared dataset, or its prep did not finish")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise InputError(f"{path}: format {manifest.get('format')} v{manifest.get('format_version')}, expected "
                         f"{FORMAT_NAME} v{' or v'.join(map(str, READABLE_FORMAT_VERSIONS))}")
    return manifest


def _size_problem(path: Path, expected_bytes: int) -> str | None:
    """``"PATH is N bytes, manifest says M"`` (or ``is missing``) when the shard file differs; None when it fits."""
    size = path.stat().st_size if path.is_file() else -1
    if size == expected_bytes:
        return None
    return f"{path} is {'missing' if size < 0 else f'{size} bytes'}, manifest says {expected_bytes}"


def check_shard_files(data_dir: str | Path, show: int = 3, manifest: dict | None = None) -> int:
    """Check that every shard the manifest lists exists with its recorded size (a ``stat`` each, no open).

    The reader opens shards lazily, so the trainer's rank 0 runs this once at start: a missing or
    truncated shard then stops the run before step 1 instead of hours into it. Returns the number
    of shards checked (count). ``manifest``: ``data_dir``'s, already read by :func:`read_manifest` (else read here).

    Raises:
        InputError: one line naming the mismatching shards (the first ``show``), their sizes in bytes
            and the manifest's, and how many there are.
    """
    data_dir = Path(data_dir)
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    bad = [p for p in (_size_problem(data_dir / s["path"], s["bytes"]) for s in shards) if p]
    if bad:
        more = f" (and {len(bad) - show} more)" if len(bad) > show else ""
        raise InputError(f"{data_dir}: {len(bad)} of {len(shards)} shards differ from the manifest: "
                         f"{'; '.join(bad[:show])}{more}")
    return len(shards)


class _OpenShard:
    """One memory-mapped shard: its record batches as ``(rows, seq_len)`` views, starts and real-token counts."""

    def __init__(self, path: Path, expected_bytes: int, expected_rows: int, seq_len: int):
        problem = _size_problem(path, expected_bytes)
        if problem:
            raise InputError(f"shard {problem}")
        table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
        if table.num_rows != expected_rows:
            raise InputError(f"{path}: shard has {table.num_rows} sequences, manifest says {expected_rows}")
        self.blocks: list[np.ndarray] = []
        self.starts: list[pa.ListArray] = []
        self.num_tokens: list[np.ndarray | None] = []
        for batch in table.to_batches():
            col = batch.column("input_ids")
            values = col.values.to_numpy(zero_copy_only=True)
            self.blocks.append(values[col.offset * seq_len:][: len(col) * seq_len].reshape(len(col), seq_len))
            self.starts.append(batch.column("document_starts"))
            has_num = "num_tokens" in batch.schema.names
            self.num_tokens.append(batch.column("num_tokens").to_numpy(zero_copy_only=True) if has_num else None)
        self.offsets = np.concatenate([[0], np.cumsum([len(b) for b in self.blocks])]).astype(np.int64)

    def locate(self, row: int) -> tuple[int, int]:
        block = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return block, row - int(self.offsets[block])


class ShardReader:
    """Memory-mapped random access to the packed sequences of one split, opening shards lazily.

    Nothing is loaded into RAM, and nothing is opened up front: the row offsets come from the
    manifest's per-shard ``sequences`` counts. A shard is ``mmap``-ed on first access (its size and
    row count checked against the manifest then), its ``input_ids`` column viewed as a
    ``(rows, seq_len)`` numpy array without copying, and at most ``max_open_shards`` stay open (least
    recently used closed first). At 10T tokens a split has ~300,000 shards: opening them all would pass
    Linux's default ``vm.max_map_count`` of 65,530 (see docs/scaling.md).

    Args:
        data_dir: a prepared folder (with ``manifest.json``).
        split: ``train`` or ``val``.
        max_open_shards: open memory maps kept (count); a random order touches up to a micro batch of
            shards per step, so a few hundred keep re-opens rare.
        verify_checksums: also hash each shard (sha256) the first time this reader opens it and compare
            with the manifest's ``sha256``: 1.3 s per GB when the file is in the page cache (measured on
            one AMD EPYC core), else the file system's read time; catches bit rot that keeps the size.
        manifest: ``data_dir``'s manifest when the caller already read it (:func:`read_manifest`), so start-up
            parses each manifest once; default: read here.

    Raises:
        InputError: missing manifest or unknown split; on first access to a shard, a shard whose size
            in bytes, sequence count or (``verify_checksums``) sha256 differs from the manifest.
    """

    def __init__(self, data_dir: str | Path, split: str = TRAIN, max_open_shards: int = 256,
                 verify_checksums: bool = False, manifest: dict | None = None):
        self.dir = Path(data_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise InputError(f"{self.dir}: no split '{split}' (splits: {', '.join(splits)})")
        if max_open_shards < 1:
            raise UserError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self.split = split
        self.seq_len: int = self.manifest["seq_len"]
        self.max_open_shards = max_open_shards
        self._shards: list[dict] = splits[split]["shards"]
        self._offsets = np.concatenate([[0], np.cumsum([s["sequences"] for s in self._shards])]).astype(np.int64)
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self.verify_checksums = verify_checksums
        self._verified: set[int] = set()
        """Shards whose sha256 matched the manifest (hashed once per reader, not on each re-open)."""

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def open_shards(self) -> int:
        """Shards memory-mapped right now (count)."""
        return len(self._open)

    def _shard(self, index: int) -> _OpenShard:
        shard = self._open.get(index)
        if shard is None:
            record = self._shards[index]
            if self.verify_checksums and index not in self._verified:
                self._verify(record)
                self._verified.add(index)
            shard = _OpenShard(self.dir / record["path"], record["bytes"], record["sequences"], self.seq_len)
            if len(self._open) >= self.max_open_shards:
                self._open.popitem(last=False)  # views handed out keep their mapping alive until dropped
            self._open[index] = shard
        else:
            self._open.move_to_end(index)
        return shard

    def _verify(self, record: dict) -> None:
        path = self.dir / record["path"]
        problem = _size_problem(path, record["bytes"])
        if problem:
            raise InputError(f"shard {problem}")
        got = sha256_file(path)
        if got != record["sha256"]:
            raise InputError(f"{path}: shard sha256 {got[:16]}..., manifest {self.dir / MANIFEST_NAME} records "
                             f"{record['sha256'][:16]}... (the file changed or rotted after prep; re-run lmforge prep)")

    def _locate(self, index: int) -> tuple[_OpenShard, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range [0, {len(self)})")
        shard_index = int(np.searchsorted(self._offsets, index, side="right") - 1)
        shard = self._shard(shard_index)
        block, row = shard.locate(index - int(self._offsets[shard_index]))
        return shard, block, row

    def __getitem__(self, index: int) -> np.ndarray:
        """The ``(seq_len,)`` token ids of sequence ``index`` (a read-only view into the mmap)."""
        shard, block, row = self._locate(index)
        return shard.blocks[block][row]

    def document_starts(self, index: int) -> list[int]:
        """Positions in sequence ``index`` where a document begins."""
        shard, block, row = self._locate(index)
        return shard.starts[block][row].as_py()

    def num_tokens(self, index: int) -> int:
        """Real (non-padding) tokens at the start of sequence ``index``; ``seq_len`` unless padded."""
        shard, block, row = self._locate(index)
        nums = shard.num_tokens[block]
        return self.seq_len if nums is None else int(nums[row])

    def batch(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """``(B, seq_len)`` int64 token ids for ``indices`` (a copy, ready for ``torch.from_numpy``)."""
        return self.read_batch(indices)[0]

    def read_batch(self, indices: list[int] | np.ndarray) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
        """``(token ids (B, seq_len) int64, document starts per sequence, real-token counts (B,) int64)``.

        What the trainer reads per micro batch, located once per sequence (one vectorized binary
        search over the shards' row offsets).

        Raises:
            IndexError: an index outside ``[0, len(self))``.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sequences {idx.tolist()} not all in range [0, {len(self)})")
        shard_of = np.searchsorted(self._offsets, idx, side="right") - 1
        ids = np.empty((len(idx), self.seq_len), dtype=np.int64)
        starts: list[list[int]] = []
        nums = np.full(len(idx), self.seq_len, dtype=np.int64)
        for k, (i, s) in enumerate(zip(idx.tolist(), shard_of.tolist())):
            shard = self._shard(s)
            block, row = shard.locate(i - int(self._offsets[s]))
            ids[k] = shard.blocks[block][row]
            starts.append(shard.starts[block][row].as_py())
            block_nums = shard.num_tokens[block]
            if block_nums is not None:
                nums[k] = block_nums[row]
        return ids, starts, nums

    def batch_num_tokens(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """``(B,)`` int64 real-token counts for ``indices``; ``arange(seq_len) < n[:, None]`` is the loss mask."""
        return self.read_batch(indices)[2]
