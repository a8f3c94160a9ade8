"""Where training sequences come from: prepared Arrow shards (the fast path) or a raw corpus streamed
and tokenized on the fly (the slower path, no prep step).

Both give each data-parallel rank its own endless stream of :class:`~pretrain.data.MicroBatch` and a
fixed list of validation micro batches (the same number on every rank).

The streaming path reads with ``datasets.load_dataset(..., streaming=True)`` split across ranks by
``datasets.distributed.split_dataset_by_node`` and packs with :class:`data_prep.pack.Packer`. It
tokenizes while training (on CPU it competes with the step for cores), holds out validation
documents by the same content hash as prep, and resumes by re-reading and skipping the consumed
sequences (O(consumed), not O(1) as with shards): use prep for anything long.
"""
from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from data_prep.blend import BlendedReader
from data_prep.encode import TRAIN, VAL
from data_prep.errors import InputError
from data_prep.pack import Packer
from data_prep.prep import is_validation
from data_prep.reader import JSONL_SUFFIXES, PARQUET_SUFFIXES, resolve_inputs
from data_prep.shards import ShardReader
from data_prep.tokenizer.folder import TOKENIZER_FILE, TokenizerInfo
from pretrain.config import DataConfig
from pretrain.data import MicroBatch, eval_batches, eval_indices, micro_batches, padded
from pretrain.distributed import log_rank0


class ShardSource:
    """Memory-mapped shards of a prepared dataset, or a weighted blend of several (see
    :mod:`pretrain.data` for the sample order, :mod:`data_prep.blend` for the blend)."""

    def __init__(self, data_dir: str = "", blend: Sequence[tuple[str, float]] = (), seed: int = 0,
                 max_epochs: Sequence[float] | None = None, schedule: Sequence[tuple[int, Sequence[float]]] = (),
                 verify_checksums: bool = False, manifests: dict[str, dict] | None = None):
        """``verify_checksums``: hash each shard once when first opened (``data.verify_checksums``).
        ``manifests``: :func:`read_manifests` of the data config when the caller has it (each read once)."""
        known = manifests or {}
        self.train: Any  # a ShardReader, or a BlendedReader with its interface
        self.val: Any

        def reader(d: str, split: str) -> ShardReader:
            return ShardReader(d, split, verify_checksums=verify_checksums, manifest=known.get(d))

        if blend:
            dirs, weights = [d for d, _ in blend], [w for _, w in blend]
            self.train = BlendedReader([reader(d, TRAIN) for d in dirs], weights, seed=seed,
                                       max_epochs=max_epochs, schedule=schedule)
            vals = [(reader(d, VAL), w) for d, w in blend]
            vals = [(r, w) for r, w in vals if len(r)]
            self.val = (BlendedReader([r for r, _ in vals], [w for _, w in vals], seed=seed) if vals
                        else reader(dirs[0], VAL))
        else:
            self.train, self.val = reader(data_dir, TRAIN), reader(data_dir, VAL)
        self.manifest = self.train.manifest
        self.num_train_sequences: int | None = len(self.train)
        self.num_val_sequences = len(self.val)

    @classmethod
    def from_config(cls, data: DataConfig, seed: int, global_batch: int, max_steps: int,
                    manifests: dict[str, dict] | None = None) -> ShardSource:
        """The source of ``data`` (a path or a blend, its caps and schedule, schedule steps turned into blend
        samples as ``step * global_batch``); logs a blend's effective mixture over the planned
        ``max_steps * global_batch`` samples (samples, tokens, epochs and share per dataset)."""
        source = cls(data.path, [(b.path, b.weight) for b in data.blend], seed, [b.max_epochs for b in data.blend],
                     schedule_samples(data, global_batch), verify_checksums=data.verify_checksums, manifests=manifests)
        if isinstance(source.train, BlendedReader):
            planned = max_steps * global_batch
            for b, m in zip(data.blend, source.train.mixture(planned)):
                log_rank0("blend %s: weight %.3f, max_epochs %s -> %d samples (%d tokens), %.2f epochs, effective share %.3f of "
                          "the %d planned samples", b.path, b.weight, b.max_epochs or "none", m["samples"], m["tokens"],
                          m["epochs"], m["share"], planned)
        return source

    def train_batches(self, rank: int, world_size: int, micro_batch_size: int, seed: int,
                      consumed_samples: int) -> Iterator[MicroBatch]:
        return micro_batches(self.train, rank, world_size, micro_batch_size, seed, consumed_samples)

    def val_batches(self, rank: int, world_size: int, micro_batch_size: int, max_batches: int) -> list[MicroBatch]:
        return list(eval_batches(self.val, rank, world_size, micro_batch_size, max_batches))


def schedule_samples(data: DataConfig | dict, global_batch: int) -> list[tuple[int, list[float]]]:
    """``data.blend_schedule`` as ``[(start blend sample = step * global_batch, weights)]`` (a config or its dict)."""
    phases = data.get("blend_schedule") if isinstance(data, dict) else [vars(p) for p in data.blend_schedule]
    return [(int(p["step"]) * global_batch, [float(w) for w in p["weights"]]) for p in phases or []]


def read_manifests(data: dict) -> dict[str, dict]:
    """Each prepared folder of a run's data config (``path``, ``blend``; ``TrainConfig.data`` as a dict) -> its
    parsed manifest (:func:`data_prep.shards.read_manifest`), each read once; empty for a raw corpus.

    Start-up passes the result to :func:`describe_data`, ``check_shard_files`` and :class:`ShardSource`.
    """
    from data_prep.shards import read_manifest

    dirs = ([data["path"]] if data.get("path") else []) + [b["path"] for b in data.get("blend") or []]
    return {d: read_manifest(d) for d in dict.fromkeys(dirs)}


def describe_data(data: dict, manifests: dict[str, dict] | None = None) -> tuple[dict | None, str]:
    """``(manifest, fingerprint)`` of a run's data config (``TrainConfig.data`` as a dict).

    The manifest is the prepared dataset's, a blend's (counts summed over its datasets, weights in
    ``blend``), or None for a raw corpus. The fingerprint is a sha256 over the manifest files' sha256
    and blend weights (and the blend's ``max_epochs`` and ``blend_schedule`` where set), or over the raw
    corpus file list: the trainer records it in checkpoints, and resume and export refuse data that changed.
    ``manifests``: :func:`read_manifests` of ``data`` (read here when not given).
    """
    import hashlib
    import json

    from data_prep.shards import MANIFEST_NAME, sha256_file

    parts = ([(data["path"], 1.0)] if data.get("path") else []) + [(b["path"], b["weight"]) for b in data.get("blend") or []]
    if not parts:
        files = [str(p) for p in resolve_inputs(list(data["raw_inputs"]))]
        return None, hashlib.sha256("\n".join(files).encode()).hexdigest()
    manifests = manifests if manifests is not None else read_manifests(data)
    mixture = {"max_epochs": [b.get("max_epochs", 0.0) for b in data.get("blend") or []], "schedule": data.get("blend_schedule") or []}
    keyed: list = [(sha256_file(Path(p) / MANIFEST_NAME), w) for p, w in parts]
    if any(mixture["max_epochs"]) or mixture["schedule"]:  # plain blends keep their earlier fingerprint
        keyed.append(mixture)
    fingerprint = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()
    if len(parts) == 1 and data.get("path"):
        return manifests[data["path"]], fingerprint
    blend = BlendedReader([ShardReader(p, "train", manifest=manifests[p]) for p, _ in parts], [w for _, w in parts]).manifest
    each = [manifests[p] for p, _ in parts]
    counts = {k: sum(m["counts"].get(k, 0) for m in each) for k in each[0]["counts"]}
    sources = [s for m in each for s in (m["sources"] if isinstance(m.get("sources"), list) else [])]
    return {**blend, "counts": counts, "sources": sources}, fingerprint


def _builder(files: list[Path]) -> tuple[str, dict]:
    names = {p.name for p in files}
    if all(n.endswith(JSONL_SUFFIXES) for n in names):
        return "json", {}
    if all(n.endswith(PARQUET_SUFFIXES) for n in names):
        return "parquet", {}
    if not any(n.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES) for n in names):
        return "text", {"sample_by": "document"}
    raise InputError(f"{files[0]}: streaming needs one format per run (jsonl, parquet or text files), got a mix")


class StreamingSource:
    """A raw corpus tokenized and packed on the fly, split across ranks by ``datasets``."""

    num_train_sequences = None
    """Unknown before reading the whole stream."""

    def __init__(self, inputs: list[str], tok: TokenizerInfo, seq_len: int, text_column: str, val_fraction: float):
        from tokenizers import Tokenizer

        self.files = [str(p) for p in resolve_inputs(inputs)]
        self.builder, self.builder_kwargs = _builder([Path(f) for f in self.files])
        self.tokenizer = Tokenizer.from_file(str(Path(tok.path) / TOKENIZER_FILE))
        self.tok, self.seq_len, self.text_column, self.val_fraction = tok, seq_len, text_column, val_fraction

    def _texts(self, rank: int, world_size: int, split: str) -> Iterator[str]:
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        ds = load_dataset(self.builder, data_files=self.files, split="train", streaming=True, **self.builder_kwargs)
        if world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        column = "text" if self.builder == "text" else self.text_column
        want_val = split == VAL
        for record in ds:
            text = record.get(column)
            if isinstance(text, str) and text.strip() and is_validation(text, self.val_fraction) == want_val:
                yield text

    def _sequences(self, rank: int, world_size: int, split: str, batch_docs: int = 64) -> Iterator[tuple[np.ndarray, list[int]]]:
        assert self.tok.eos_token_id is not None  # preflight refuses a tokenizer without eos for a causal LM
        packer = Packer(self.seq_len, self.tok.eos_token_id, self.tok.bos_token_id)
        texts = self._texts(rank, world_size, split)
        while batch := list(islice(texts, batch_docs)):
            for enc in self.tokenizer.encode_batch_fast(batch, add_special_tokens=False):
                yield from packer.add(enc.ids)

    def train_batches(self, rank: int, world_size: int, micro_batch_size: int, seed: int,
                      consumed_samples: int) -> Iterator[MicroBatch]:
        """Endless: the stream restarts at its end (one epoch per pass); skips this rank's share of
        ``consumed_samples`` by re-reading. ``seed`` is unused: the order is the corpus order."""
        skip = consumed_samples // world_size
        counter = 0
        while True:
            produced = 0
            rows, starts = [], []
            for seq, doc_starts in self._sequences(rank, world_size, TRAIN):
                produced += 1
                if skip:
                    skip -= 1
                    continue
                rows.append(seq)
                starts.append(doc_starts)
                if len(rows) == micro_batch_size:
                    yield MicroBatch(np.stack(rows), np.arange(counter, counter + micro_batch_size), starts)
                    counter += micro_batch_size
                    rows, starts = [], []
            if produced == 0:
                raise InputError(f"{self.files[0]}: the training stream of rank {rank} holds no full sequence of {self.seq_len} tokens")

    def val_batches(self, rank: int, world_size: int, micro_batch_size: int, max_batches: int) -> list[MicroBatch]:
        """The first held-out sequences of the whole stream (read unsplit), sliced per rank like the shard path."""
        need = max_batches * world_size * micro_batch_size
        seqs = list(islice(self._sequences(0, 1, VAL), need))
        out = []
        for idx in eval_indices(len(seqs), rank, world_size, micro_batch_size, max_batches):
            chunk = [seqs[i] for i in np.where(idx >= 0, idx, 0)]
            out.append(padded(idx, np.stack([s for s, _ in chunk]), [d for _, d in chunk], None))
        return out
