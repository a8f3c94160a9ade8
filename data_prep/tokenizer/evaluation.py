"""Evaluate tokenizers on held-out text, side by side: compression, fertility, unk rate, round trip, utilisation, speed.

Metrics (all over the same documents, special tokens not added):

- ``bytes_per_token``: UTF-8 bytes of the text / tokens (higher: better compression).
- ``tokens_per_word`` (fertility): tokens / whitespace-separated words (``str.split``; a CJK run
  without spaces counts as one word).
- ``unk_rate``: unk tokens / tokens (0 for byte-level tokenizers, which have none).
- ``round_trip_rate``: documents whose decoding gives back what the family promises / documents:
  the text itself (``exact``: byte-bpe, and tokenizers lmforge did not train), or the normalized
  text (``normalized``: bpe NFC, unigram NFKC); ``None`` where the design is lossy (wordpiece).
- ``vocab_utilisation``: distinct ids produced / vocabulary size.
- ``encode_mb_per_s`` and ``tokens_per_s``: ``encode_batch_fast`` throughput (wall clock, all the
  tokenizers' threads; batches alternate which tokenizer goes first).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_prep.tokenizer.corpus import DEFAULT_BATCH_BYTES, CorpusStats, CorpusText
from data_prep.tokenizer.families import ROUND_TRIP_NONE, ROUND_TRIP_NORMALIZED
from data_prep.tokenizer.folder import fingerprint, load_tokenizer, read_metadata


@dataclass
class _Scorer:
    """Running counts of one tokenizer."""

    path: str
    family: str
    fingerprint: str
    vocab_size: int
    round_trip: str
    backend: Any
    unk_id: int | None
    tokens: int = 0
    unk_tokens: int = 0
    round_trip_ok: int = 0
    encode_seconds: float = 0.0
    used: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """(vocab_size,) bool: ids seen so far."""

    @classmethod
    def load(cls, tokenizer_dir: str) -> _Scorer:
        tok = load_tokenizer(tokenizer_dir)
        meta = read_metadata(tokenizer_dir)
        promise = meta.get("round_trip", "unknown")
        size = len(tok)
        return cls(path=str(tokenizer_dir), family=meta.get("family", "unknown"), fingerprint=fingerprint(tokenizer_dir),
                   vocab_size=size, round_trip=promise, backend=tok.backend_tokenizer, unk_id=tok.unk_token_id,
                   used=np.zeros(size, dtype=bool))

    def encode(self, texts: list[str]) -> list[list[int]]:
        start = time.perf_counter()
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        self.encode_seconds += time.perf_counter() - start
        return [e.ids for e in encodings]

    def score(self, texts: list[str], ids: list[list[int]]) -> None:
        flat = np.fromiter((i for doc in ids for i in doc), dtype=np.int64)
        self.tokens += flat.size
        self.used[flat[flat < self.vocab_size]] = True
        if self.unk_id is not None:
            self.unk_tokens += int(np.count_nonzero(flat == self.unk_id))
        if self.round_trip == ROUND_TRIP_NONE:
            return
        decoded = self.backend.decode_batch(ids, skip_special_tokens=False)
        normalizer = self.backend.normalizer if self.round_trip == ROUND_TRIP_NORMALIZED else None
        for text, back in zip(texts, decoded):
            expected = normalizer.normalize_str(text) if normalizer is not None else text
            self.round_trip_ok += back == expected

    def result(self, documents: int, text_bytes: int, words: int) -> dict:
        tokens = max(self.tokens, 1)
        seconds = max(self.encode_seconds, 1e-9)
        return {
            "path": self.path, "family": self.family, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
            "tokens": self.tokens, "bytes_per_token": text_bytes / tokens, "tokens_per_word": self.tokens / max(words, 1),
            "unk_rate": self.unk_tokens / tokens if self.unk_id is not None else 0.0,
            "round_trip": self.round_trip,
            "round_trip_rate": None if self.round_trip == ROUND_TRIP_NONE else self.round_trip_ok / max(documents, 1),
            "vocab_utilisation": int(self.used.sum()) / self.vocab_size,
            "encode_mb_per_s": text_bytes / seconds / 1e6, "tokens_per_s": self.tokens / seconds,
        }


def evaluate_tokenizers(tokenizer_dirs: Sequence[str], inputs: Sequence[str], text_column: str = "text",
                        max_bytes: int | None = None, seed: int = 0, batch_bytes: int = DEFAULT_BATCH_BYTES) -> dict:
    """Score each tokenizer on the same documents of ``inputs`` (streamed; a ``max_bytes`` sample if given).

    Returns:
        ``{"inputs", "documents", "text_bytes", "words", "rejects", "tokenizers": [metrics per tokenizer]}``,
        metrics as described in the module docstring.

    Raises:
        InputError: a folder is not a loadable tokenizer, inputs are missing, or no usable document.
    """
    from data_prep.errors import InputError

    scorers = [_Scorer.load(d) for d in tokenizer_dirs]
    text = CorpusText(inputs, text_column, max_bytes, seed, batch_bytes)
    stats = CorpusStats()
    words = 0
    for n, batch in enumerate(text.batches(stats)):
        words += sum(len(t.split()) for t in batch)
        for scorer in (scorers if n % 2 == 0 else scorers[::-1]):
            scorer.score(batch, scorer.encode(batch))
    if stats.documents == 0:
        raise InputError(f"{text.describe()}: empty corpus, no usable document ({stats.rejects.total} rejected)")
    return {"inputs": list(inputs), "documents": stats.documents, "text_bytes": stats.text_bytes, "words": words,
            "rejects": stats.rejects.total, "max_bytes": max_bytes, "seed": seed,
            "tokenizers": [s.result(stats.documents, stats.text_bytes, words) for s in scorers]}


def _column_names(paths: Sequence[str]) -> list[str]:
    names = [Path(p).name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def format_table(report: dict) -> str:
    """The report as a fixed-width text table: one row per metric, one column per tokenizer."""
    toks = report["tokenizers"]

    def rate(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    rows = [
        ("family", [t["family"] for t in toks]),
        ("vocab size (tokens)", [str(t["vocab_size"]) for t in toks]),
        ("bytes / token", [f"{t['bytes_per_token']:.3f}" for t in toks]),
        ("tokens / word", [f"{t['tokens_per_word']:.3f}" for t in toks]),
        ("unk rate", [rate(t["unk_rate"]) for t in toks]),
        ("round trip", [f"{rate(t['round_trip_rate'])} ({t['round_trip']})" for t in toks]),
        ("vocab utilisation", [rate(t["vocab_utilisation"]) for t in toks]),
        ("encode MB/s", [f"{t['encode_mb_per_s']:.2f}" for t in toks]),
        ("tokens/s", [f"{t['tokens_per_s']:,.0f}" for t in toks]),
    ]
    header = ("metric", _column_names([t["path"] for t in toks]))
    width0 = max(len(r[0]) for r in [header, *rows])
    widths = [max(len(header[1][i]), *(len(r[1][i]) for r in rows)) for i in range(len(toks))]
    lines = [f"{header[0]:<{width0}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(header[1], widths))]
    lines.append("-" * len(lines[0]))
    lines += [f"{name:<{width0}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths)) for name, values in rows]
    lines.append(f"{report['documents']} documents, {report['text_bytes']:,} bytes, {report['words']:,} words"
                 f" ({report['rejects']} rejected)")
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    """Write the report as JSON (temp file + rename)."""
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)

