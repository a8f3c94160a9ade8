"""``lmforge prep``: read a corpus, tokenize it, pack it and write Arrow shards plus a manifest.

Tokenization runs in ``tokenizers``' Rust thread pool (``encode_batch_fast`` over batches of
about ``batch_bytes`` of text), so it uses every core with no Python worker processes. The
validation split is chosen per document by a hash of its text, so the same text always lands in
the same split (no leakage, deterministic whatever the order of the inputs).
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from tqdm.auto import tqdm

from data_prep.errors import InputError, UserError
from data_prep.pack import Packer
from data_prep.reader import RejectLog, iter_documents, resolve_inputs
from data_prep.shards import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, REJECTS_NAME, ShardWriter,
                              token_dtype, write_json_atomic)
from data_prep.tokenizer import TOKENIZER_FILE, load_tokenizer_info

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


@dataclass
class PrepConfig:
    """Configuration of one prep run."""

    inputs: list[str]
    """Corpus paths, globs, directories, or ``stdlib``."""
    tokenizer: str
    """Folder of a saved tokenizer (``tokenizer.json`` inside)."""
    output: str
    """Folder to write shards, rejects and manifest into."""
    seq_len: int = 512
    """Tokens per packed sequence."""
    val_fraction: float = 0.005
    """Fraction of documents (by content hash) held out for validation, in [0, 1)."""
    text_column: str = "text"
    """Field of jsonl / parquet records that holds the text."""
    sequences_per_shard: int = 16384
    """Packed sequences per Arrow shard."""
    batch_bytes: int = 4 << 20
    """Bytes of text handed to the tokenizer per ``encode_batch`` call."""
    overwrite: bool = False
    """Replace an existing complete prepared folder instead of refusing."""
    show_progress: bool = True

    def validate(self) -> None:
        """Raise one :class:`UserError` listing every invalid field."""
        problems = []
        if self.seq_len < 2:
            problems.append(f"seq_len={self.seq_len} must be >= 2 tokens")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.sequences_per_shard < 1:
            problems.append(f"sequences_per_shard={self.sequences_per_shard} must be >= 1")
        if self.batch_bytes < 1:
            problems.append(f"batch_bytes={self.batch_bytes} must be >= 1")
        if problems:
            raise UserError("prep config: " + "; ".join(problems))


def is_validation(text: str, val_fraction: float) -> bool:
    """True when the document's content hash (blake2b, 64 bit) falls below ``val_fraction``."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _lmforge_version() -> str:
    try:
        return metadata.version("lmforge")
    except metadata.PackageNotFoundError:
        return "unknown"


def _prepare_output(out: Path, overwrite: bool) -> None:
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise UserError(f"{out}: already holds a prepared dataset ({MANIFEST_NAME}); pass --overwrite to replace it")
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the folder is not complete
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def prepare(cfg: PrepConfig) -> dict:
    """Run prep; returns the manifest that was written to ``cfg.output/manifest.json``.

    Raises:
        UserError: invalid config, or an existing prepared folder without ``overwrite``.
        InputError: missing / unreadable inputs, or no usable document (the manifest is not written).
    """
    from tokenizers import Tokenizer

    cfg.validate()
    tok_info = load_tokenizer_info(cfg.tokenizer)
    if tok_info.eos_token_id is None:
        raise UserError(f"{cfg.tokenizer}: tokenizer defines no eos token; packing needs one to mark document ends")
    files = resolve_inputs(cfg.inputs)
    out = Path(cfg.output)
    _prepare_output(out, cfg.overwrite)
    tokenizer = Tokenizer.from_file(str(Path(cfg.tokenizer) / TOKENIZER_FILE))
    dtype = token_dtype(tok_info.vocab_size)
    packers = {s: Packer(cfg.seq_len, tok_info.eos_token_id, tok_info.bos_token_id) for s in SPLITS}
    writers = {s: ShardWriter(out, s, cfg.seq_len, dtype, cfg.sequences_per_shard) for s in SPLITS}
    rejects = RejectLog(out / REJECTS_NAME)
    total_bytes = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prep", disable=not cfg.show_progress)
    start = time.perf_counter()
    try:
        batch, batch_bytes = [], 0
        for doc in iter_documents([str(p) for p in files], cfg.text_column, rejects):
            batch.append(doc.text)
            batch_bytes += len(doc.text)
            if batch_bytes >= cfg.batch_bytes:
                _encode_and_pack(tokenizer, batch, cfg.val_fraction, packers, writers)
                bar.update(batch_bytes)
                batch, batch_bytes = [], 0
        if batch:
            _encode_and_pack(tokenizer, batch, cfg.val_fraction, packers, writers)
            bar.update(batch_bytes)
        for packer in packers.values():
            packer.finish()
        shards = {s: writers[s].close() for s in SPLITS}
    finally:
        bar.close()
        rejects.close()
    documents = sum(p.documents for p in packers.values())
    if documents == 0:
        raise InputError(f"{', '.join(cfg.inputs)}: empty corpus, no usable document ({rejects.total} rejected, see {rejects.path})")
    elapsed_s = time.perf_counter() - start
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lmforge_version": _lmforge_version(),
        "created_unix_s": round(time.time(), 3),
        "objective": "clm",
        "seq_len": cfg.seq_len,
        "token_dtype": dtype.name,
        "tokenizer": {
            "fingerprint": tok_info.fingerprint,
            "vocab_size": tok_info.vocab_size,
            "eos_token_id": tok_info.eos_token_id,
            "bos_token_id": tok_info.bos_token_id,
            "pad_token_id": tok_info.pad_token_id,
        },
        "sources": [str(p) for p in files] if len(files) <= 64 else {"files": len(files), "first": str(files[0]), "last": str(files[-1])},
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("show_progress", "overwrite")},
        "counts": {
            "documents": documents,
            "tokens": sum(p.tokens for p in packers.values()),
            "sequences": sum(p.sequences for p in packers.values()),
            "rejects": rejects.total,
            "tokens_dropped": sum(p.tokens_dropped for p in packers.values()),
            "tokens_padded": 0,
        },
        "rejects_by_reason": dict(rejects.counts),
        "splits": {
            s: {"documents": packers[s].documents, "tokens": packers[s].tokens, "sequences": packers[s].sequences,
                "tokens_dropped": packers[s].tokens_dropped, "shards": shards[s]}
            for s in SPLITS
        },
        "elapsed_s": round(elapsed_s, 3),
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    c = manifest["counts"]
    log.info("prep: %d documents, %d tokens, %d sequences of %d tokens, %d rejects in %.1f s (%.0f tokens/s) -> %s",
             c["documents"], c["tokens"], c["sequences"], cfg.seq_len, c["rejects"], elapsed_s, c["tokens"] / max(elapsed_s, 1e-9), out)
    return manifest


def _encode_and_pack(tokenizer, texts: list[str], val_fraction: float, packers: dict, writers: dict) -> None:
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    for text, enc in zip(texts, encodings):
        split = "val" if is_validation(text, val_fraction) else "train"
        for seq, starts in packers[split].add(enc.ids):
            writers[split].add(seq, starts)
