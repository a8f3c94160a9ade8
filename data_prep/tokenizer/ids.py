"""The tokenizer ids prep records, read with ``tokenizers`` alone where that is unambiguous.

:func:`data_prep.tokenizer.folder.load_tokenizer_info` loads the folder with ``transformers``
``AutoTokenizer``, whose import (with ``torch``) is about 1.2 s of a small prep's 2.3 s. For a
folder saved from a ``tokenizers`` pipeline (``tokenizer_class`` ``PreTrainedTokenizerFast`` or
``TokenizersBackend``, as every lmforge-trained folder is) transformers takes the special tokens
from ``tokenizer_config.json`` and the ids and vocabulary from ``tokenizer.json``; so does
:func:`tokenizer_info`, without transformers. Anything it cannot settle that way (another
tokenizer class, whose class may default special tokens; a special token or added token missing
from ``tokenizer.json``, which transformers would add; ``special_tokens_map.json`` disagreeing with
the config) goes to ``load_tokenizer_info``.
"""
from __future__ import annotations

import json
from pathlib import Path

from data_prep.encode import load_tokenizer_file
from data_prep.tokenizer.folder import (
    CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_FILE,
    TokenizerInfo,
    fingerprint,
    load_tokenizer_info,
)

BACKEND_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
"""``tokenizer_class`` values with no class-level default special tokens (transformers 4 and 5 names)."""
ROLES = ("bos_token", "eos_token", "pad_token")


def _content(value: object) -> str | None:
    """A special token's text: a string, or the ``content`` of an ``AddedToken`` dict."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _fast_ids(folder: Path) -> dict | None:
    """Role -> id and ``vocab_size`` from ``tokenizers``, or None when transformers might decide otherwise."""
    config, special_map = _json(folder / CONFIG_FILE), _json(folder / SPECIAL_TOKENS_MAP_FILE)
    if config.get("tokenizer_class") not in BACKEND_CLASSES:
        return None
    try:
        tok = load_tokenizer_file(str(folder / TOKENIZER_FILE))  # cached: prep's encoder reuses it
    except Exception:  # tokenizers raises a bare Exception; the transformers path reports it as an InputError
        return None
    added = [(int(k), _content(v)) for k, v in (config.get("added_tokens_decoder") or {}).items()]
    extra = [_content(t) for key in ("extra_special_tokens", "additional_special_tokens")
             for t in config.get(key) or []]
    if any(tok.token_to_id(text) != i for i, text in added) or any(tok.token_to_id(t) is None for t in extra):
        return None
    out: dict = {"vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    for role in ROLES:
        text = _content(config.get(role))
        if role in special_map and _content(special_map[role]) != text:
            return None
        out[role] = None if text is None else tok.token_to_id(text)
        if text is not None and out[role] is None:
            return None
    return out


def tokenizer_info(tokenizer_dir: str | Path) -> TokenizerInfo:
    """The :class:`TokenizerInfo` of a saved tokenizer folder, equal to ``load_tokenizer_info``'s.

    Raises:
        InputError: the folder holds no ``tokenizer.json``, or (on the transformers path) no loadable tokenizer.
    """
    fp = fingerprint(tokenizer_dir)
    ids = _fast_ids(Path(tokenizer_dir))
    if ids is None:
        return load_tokenizer_info(tokenizer_dir)
    return TokenizerInfo(path=str(tokenizer_dir), fingerprint=fp, vocab_size=ids["vocab_size"],
                         eos_token_id=ids["eos_token"], bos_token_id=ids["bos_token"], pad_token_id=ids["pad_token"])
