"""Consistency checks run before step 1: tokenizer, model embedding, data and seq_len must agree.

A tokenizer whose ids exceed the embedding, or data tokenized by another tokenizer, trains
garbage without any error from torch on CPU (or a device-side assert on GPU, long after start).
"""
from __future__ import annotations

from data_prep.tokenizer.folder import TokenizerInfo
from pretrain.errors import ConsistencyError


def check_consistency(tok: TokenizerInfo, manifest: dict | None, model_config, seq_len: int, objective: str = "clm") -> None:
    """Raise one :class:`ConsistencyError` listing every disagreement, with the numbers.

    Checks: tokenizer size <= embedding rows; special-token ids inside the embedding; ``seq_len``
    equals the data's and fits ``max_position_embeddings``; the manifest's tokenizer fingerprint
    equals the tokenizer's; the data's objective equals the model's. ``manifest`` is None for a raw
    corpus streamed through this very tokenizer: the data checks then do not apply.
    """
    problems: list[str] = []
    rows = model_config.vocab_size
    if tok.vocab_size > rows:
        problems.append(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model embedding has {rows} rows (model.vocab_size)")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tok, name)
        if value is not None and not 0 <= value < rows:
            problems.append(f"{name}={value} is outside the embedding [0, {rows})")
    if tok.eos_token_id is None:
        problems.append(f"tokenizer {tok.path} defines no eos token")
    data_seq_len = manifest["seq_len"] if manifest is not None else seq_len
    if seq_len != data_seq_len:
        problems.append(f"seq_len={seq_len} differs from the prepared data's seq_len={data_seq_len}")
    max_pos = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if max_pos is not None and seq_len > max_pos:
        problems.append(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    data_fp = manifest["tokenizer"]["fingerprint"] if manifest is not None else tok.fingerprint
    if data_fp != tok.fingerprint:
        problems.append(f"data was tokenized by tokenizer {data_fp[:12]}, not by {tok.path} ({tok.fingerprint[:12]})")
    if manifest is not None and manifest.get("objective", "clm") != objective:
        problems.append(f"data objective {manifest.get('objective')!r} does not match the model objective {objective!r}")
    if problems:
        raise ConsistencyError("refusing to train: " + "; ".join(problems))
