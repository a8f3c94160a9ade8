"""Tokenizer training (byte-level BPE, GPT-2 style) and the tokenizer fingerprint.

The tokenizer is built explicitly from ``tokenizers`` components (ByteLevel pre-tokenizer and
decoder, BPE model with the 256-byte initial alphabet, so no text ever maps to an unknown token)
and saved through ``transformers`` so that ``AutoTokenizer.from_pretrained(DIR)`` loads it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from data_prep.errors import InputError, UserError
from data_prep.reader import RejectLog, iter_documents, total_input_bytes

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
BYTE_ALPHABET_SIZE = 256
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerInfo:
    """What prep and training need to agree on: ids and sizes, all in tokens."""

    path: str
    fingerprint: str
    """sha256 hex digest of ``tokenizer.json``."""
    vocab_size: int
    """Number of token ids, added special tokens included (``len(tokenizer)``)."""
    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None


def fingerprint(tokenizer_dir: str | Path) -> str:
    """sha256 hex digest of ``tokenizer_dir/tokenizer.json``: recorded by prep, checked by training.

    Raises:
        InputError: the folder holds no ``tokenizer.json``.
    """
    path = Path(tokenizer_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"{path}: tokenizer file not found")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tokenizer_info(tokenizer_dir: str | Path) -> TokenizerInfo:
    """Read vocabulary size and special-token ids of a saved tokenizer folder.

    Raises:
        InputError: the folder does not hold a loadable tokenizer.
    """
    from transformers import AutoTokenizer

    fp = fingerprint(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return TokenizerInfo(
        path=str(tokenizer_dir),
        fingerprint=fp,
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _sampled_texts(
    inputs: Sequence[str], text_column: str, max_bytes: int | None, rejects: RejectLog, batch_docs: int = 256
) -> Iterator[list[str]]:
    """Batches of document texts; with ``max_bytes``, a deterministic uniform sample of about that many bytes.

    Sampling keeps a document when its content hash falls below ``max_bytes / corpus_bytes``, so
    every source contributes in proportion to its size and the same corpus gives the same sample.
    """
    keep_fraction = 1.0
    if max_bytes is not None:
        corpus_bytes = total_input_bytes(inputs)
        keep_fraction = min(1.0, max_bytes / max(corpus_bytes, 1))
    batch: list[str] = []
    kept_bytes = 0
    for doc in iter_documents(inputs, text_column, rejects):
        if keep_fraction < 1.0:
            digest = hashlib.blake2b(doc.text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            if int.from_bytes(digest, "little") / 2**64 >= keep_fraction:
                continue
        size = len(doc.text.encode("utf-8", "surrogatepass"))
        if max_bytes is not None and kept_bytes + size > max_bytes:
            continue
        kept_bytes += size
        batch.append(doc.text)
        if len(batch) == batch_docs:
            yield batch
            batch = []
    if batch:
        yield batch


def train_byte_bpe(
    inputs: Sequence[str],
    output_dir: str | Path,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    max_bytes: int | None = None,
    text_column: str = "text",
    model_max_length: int = 2048,
) -> TokenizerInfo:
    """Train a GPT-2 style byte-level BPE on ``inputs`` and save it to ``output_dir``.

    Args:
        vocab_size: target vocabulary size in tokens, ``<|endoftext|>`` included (GPT-2: 50257).
        min_frequency: a merge needs at least this many occurrences.
        max_bytes: byte budget of training text (deterministic uniform sample); ``None`` reads all.
        model_max_length: longest sequence in tokens the saved tokenizer advertises.

    The folder is written to ``output_dir.tmp`` and renamed into place, so a crash never leaves a
    folder that looks complete.

    Raises:
        UserError: ``vocab_size`` is smaller than the 256-byte alphabet plus the special token.
        InputError: missing inputs, or no usable document in them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = BYTE_ALPHABET_SIZE + 1
    if vocab_size < minimum:
        raise UserError(f"vocab_size {vocab_size} is smaller than the byte alphabet (256) plus 1 special token = {minimum}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rejects = RejectLog()
    counted = {"docs": 0}

    def batches() -> Iterator[list[str]]:
        for batch in _sampled_texts(inputs, text_column, max_bytes, rejects):
            counted["docs"] += len(batch)
            yield batch

    tok.train_from_iterator(batches(), trainer=trainer)
    if counted["docs"] == 0:
        raise InputError(f"{', '.join(map(str, inputs))}: empty corpus, no usable document ({rejects.total} rejected)")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    (tmp / "lmforge_tokenizer.json").write_text(
        json.dumps({"family": "byte-bpe", "vocab_size": vocab_size, "min_frequency": min_frequency,
                    "documents": counted["docs"], "rejects": rejects.total, "max_bytes": max_bytes}, indent=2)
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    info = load_tokenizer_info(out)
    log.info("tokenizer: %d tokens from %d documents -> %s (fingerprint %s)", info.vocab_size, counted["docs"], out, info.fingerprint[:12])
    return info
