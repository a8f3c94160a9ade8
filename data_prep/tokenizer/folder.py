"""Tokenizer folders: the fingerprint, the ids prep and training agree on, and the atomic save.

A tokenizer folder holds ``tokenizer.json`` (the ``tokenizers`` pipeline), ``tokenizer_config.json``
and ``special_tokens_map.json`` (so ``AutoTokenizer.from_pretrained(DIR)`` loads it with the right
special tokens, padding side and ``model_max_length``) and ``lmforge_tokenizer.json`` (how it was
trained: family, corpus sample, counts). Training lives in :mod:`data_prep.tokenizer.train`, the
families in :mod:`data_prep.tokenizer.families`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import InputError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
"""End-of-text token of the default byte-bpe family (GPT-2's); also its bos token."""
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
METADATA_FILE = "lmforge_tokenizer.json"
ROLE_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


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


def load_tokenizer(tokenizer_dir: str | Path):
    """``AutoTokenizer.from_pretrained`` on a local folder (never the hub).

    Raises:
        InputError: the folder holds no ``tokenizer.json`` or transformers cannot load it.
    """
    from transformers import AutoTokenizer

    fingerprint(tokenizer_dir)  # a clear error before transformers' own
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{tokenizer_dir}: not a loadable tokenizer folder ({str(exc).splitlines()[0]})") from exc


def load_tokenizer_info(tokenizer_dir: str | Path) -> TokenizerInfo:
    """Read vocabulary size and special-token ids of a saved tokenizer folder.

    Raises:
        InputError: the folder does not hold a loadable tokenizer.
    """
    fp = fingerprint(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    return TokenizerInfo(
        path=str(tokenizer_dir),
        fingerprint=fp,
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def read_metadata(tokenizer_dir: str | Path) -> dict:
    """``lmforge_tokenizer.json`` of a folder; ``{}`` for a folder lmforge did not train."""
    path = Path(tokenizer_dir) / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_replaceable_output(output_dir: str | Path) -> bool:
    """True when ``output_dir`` is absent, empty, or a tokenizer folder (safe to replace)."""
    out = Path(output_dir)
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    return not any(out.iterdir()) or (out / TOKENIZER_FILE).is_file() or (out / METADATA_FILE).is_file()


def special_tokens_map(tokenizer) -> dict:
    """The legacy ``special_tokens_map.json`` content of a transformers tokenizer: role -> token, plus extras."""
    out: dict[str, str | list[str]] = {attr: str(getattr(tokenizer, attr)) for attr in ROLE_ATTRIBUTES if getattr(tokenizer, attr, None) is not None}
    extra = [str(t) for t in getattr(tokenizer, "extra_special_tokens", None) or []]
    if extra:
        out["additional_special_tokens"] = extra
    return out


def save_tokenizer_folder(tokenizer, output_dir: str | Path, metadata: dict) -> TokenizerInfo:
    """Write a transformers tokenizer to ``output_dir`` with ``special_tokens_map.json`` and metadata.

    The folder is written to ``output_dir.tmp`` and renamed into place, so a crash never leaves a
    folder that looks complete. transformers 5 no longer writes ``special_tokens_map.json``; it is
    written here for tools that still read it.

    Returns:
        The saved folder's :class:`TokenizerInfo` (loaded back through ``AutoTokenizer``).
    """
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_tokens_map(tokenizer), indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    meta = {**metadata, "fingerprint": hashlib.sha256((tmp / TOKENIZER_FILE).read_bytes()).hexdigest()}
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return load_tokenizer_info(out)

