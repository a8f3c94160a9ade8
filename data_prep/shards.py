"""The on-disk format of a prepared dataset, its writer and its memory-mapped reader.

Layout of a prepared folder ``DIR``::

    DIR/manifest.json              written last (temp + rename): no manifest, not complete
    DIR/rejects.jsonl              records that were rejected, one JSON object per line
    DIR/<split>/shard-00000.arrow  Arrow IPC *stream* files (the format ``datasets`` caches use)

Each shard row is one packed sequence:

- ``input_ids``: ``fixed_size_list<uint16|uint32>[seq_len]``; uint16 when the vocabulary fits
  in 65536 ids, else uint32.
- ``document_starts``: ``list<int32>``, the positions in the sequence where a document begins
  (its first token). Position 0 is listed only when a document starts exactly there; otherwise
  the sequence opens with the tail of a document begun in the previous sequence.

Inspect a split with ``datasets``::

    datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in sorted(glob.glob("DIR/train/*.arrow"))])
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.errors import InputError

FORMAT_NAME = "lmforge-packed-sequences"
FORMAT_VERSION = 1
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
        ]
    )


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in ``chunk_bytes`` pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path.tmp`` and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ShardWriter:
    """Writes packed sequences of one split into shards of at most ``sequences_per_shard`` rows.

    Each shard is written to ``*.arrow.tmp`` and renamed when full, with its sha256 and size in
    bytes recorded for the manifest. Rows are buffered and written ``batch_rows`` at a time.
    """

    def __init__(self, out_dir: str | Path, split: str, seq_len: int, dtype: np.dtype,
                 sequences_per_shard: int = 65536, batch_rows: int = 1024):
        self.dir = Path(out_dir) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.seq_len, self.dtype = split, seq_len, np.dtype(dtype)
        self.sequences_per_shard, self.batch_rows = sequences_per_shard, batch_rows
        self.schema = shard_schema(seq_len, self.dtype)
        self.shards: list[dict] = []
        self._ids: list[np.ndarray] = []
        self._starts: list[list[int]] = []
        self._writer = None
        self._rows_in_shard = 0

    def add(self, ids: np.ndarray, document_starts: list[int]) -> None:
        """Append one ``(seq_len,)`` sequence and the positions where its documents start."""
        if ids.shape != (self.seq_len,):
            raise ValueError(f"sequence has shape {ids.shape}, expected ({self.seq_len},)")
        self._ids.append(ids)
        self._starts.append(document_starts)
        if len(self._ids) >= self.batch_rows or self._rows_in_shard + len(self._ids) >= self.sequences_per_shard:
            self._flush()

    def _shard_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}.arrow"

    def _flush(self) -> None:
        if not self._ids:
            return
        if self._writer is None:
            tmp = self._shard_path(len(self.shards)).with_suffix(".arrow.tmp")
            self._writer = pa.ipc.new_stream(str(tmp), self.schema)
        flat = np.stack(self._ids).astype(self.dtype, copy=False).reshape(-1)
        ids = pa.FixedSizeListArray.from_arrays(pa.array(flat), self.seq_len)
        starts = pa.array(self._starts, type=pa.list_(pa.int32()))
        self._writer.write_batch(pa.record_batch([ids, starts], schema=self.schema))
        self._rows_in_shard += len(self._ids)
        self._ids, self._starts = [], []
        if self._rows_in_shard >= self.sequences_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        final = self._shard_path(len(self.shards))
        tmp = final.with_suffix(".arrow.tmp")
        os.replace(tmp, final)
        self.shards.append({
            "path": f"{self.split}/{final.name}",
            "sequences": self._rows_in_shard,
            "bytes": final.stat().st_size,
            "sha256": sha256_file(final),
        })
        self._rows_in_shard = 0

    def close(self) -> list[dict]:
        """Flush and close; returns the shard records (path, sequences, bytes, sha256)."""
        self._flush()
        self._close_shard()
        return self.shards


def read_manifest(data_dir: str | Path) -> dict:
    """Load and check ``data_dir/manifest.json``.

    Raises:
        InputError: no manifest (not prepared, or prep did not finish), or an unknown format.
    """
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{data_dir}: no {MANIFEST_NAME}; not a prepared dataset, or its prep did not finish")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: format {manifest.get('format')} v{manifest.get('format_version')}, expected {FORMAT_NAME} v{FORMAT_VERSION}"
        )
    return manifest


class ShardReader:
    """Memory-mapped random access to the packed sequences of one split.

    Nothing is loaded into RAM: each shard is ``mmap``-ed and its ``input_ids`` column viewed as a
    ``(rows, seq_len)`` numpy array without copying.

    Raises:
        InputError: missing manifest, unknown split, or a shard whose size differs from the manifest.
    """

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise InputError(f"{self.dir}: no split '{split}' (splits: {', '.join(splits)})")
        self.split = split
        self.seq_len: int = self.manifest["seq_len"]
        self._blocks: list[np.ndarray] = []
        self._starts: list[pa.ListArray] = []
        for shard in splits[split]["shards"]:
            path = self.dir / shard["path"]
            size = path.stat().st_size if path.is_file() else -1
            if size != shard["bytes"]:
                raise InputError(f"{path}: shard is {size} bytes, manifest says {shard['bytes']}")
            table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
            for batch in table.to_batches():
                col = batch.column("input_ids")
                values = col.values.to_numpy(zero_copy_only=True)
                self._blocks.append(values[col.offset * self.seq_len:][: len(col) * self.seq_len].reshape(len(col), self.seq_len))
                self._starts.append(batch.column("document_starts"))
        sizes = [len(b) for b in self._blocks]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range [0, {len(self)})")
        block = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return block, index - int(self._offsets[block])

    def __getitem__(self, index: int) -> np.ndarray:
        """The ``(seq_len,)`` token ids of sequence ``index`` (a read-only view into the mmap)."""
        block, row = self._locate(index)
        return self._blocks[block][row]

    def document_starts(self, index: int) -> list[int]:
        """Positions in sequence ``index`` where a document begins."""
        block, row = self._locate(index)
        return self._starts[block][row].as_py()

    def batch(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """``(B, seq_len)`` int64 token ids for ``indices`` (a copy, ready for ``torch.from_numpy``)."""
        return np.stack([self[int(i)] for i in indices]).astype(np.int64)
