"""Reproducible Unigram tokenizers: canonical piece ids and piece scores recounted from the training text.

tokenizers' ``UnigramTrainer`` is not bit-reproducible, not even within one process or on one
thread (``RAYON_NUM_THREADS=1``): it keeps the training words in an ``AHashMap``, whose hash keys
are random per map, and runs its EM sums over the words in that map's order (and over rayon
chunks), so the floating-point sums round differently from run to run. Measured on the test corpus
(240 KB, 700 pieces, three runs): the piece set was the same every time, but 47-88 % of the scores
differed, multi-character pieces by up to 4e-11 (4.8e-12 relative) and the characters that fell
out of the model by up to 1.4e-3 (``finalize`` scores them ``min_score + k * 1e-4`` with ``k``
counted in ``AHashSet`` order). Piece ids (the trainer orders pieces by score) and so
``tokenizer.json`` and its fingerprint changed with every run.

No setting removes that (the hash keys cannot be fixed from Python), so :func:`make_reproducible`
replaces the trainer's output with a deterministic function of its piece set:

1. ids: special tokens keep their ids, the other pieces follow sorted by text;
2. scores: one pass over the training text with the trained tokenizer counts how often each piece
   is on the Viterbi segmentation (tokenizers' own ``encode``), and a piece's score becomes
   ``ln(count / total)`` (the unigram language model's maximum-likelihood estimate from those
   segmentations, i.e. one hard-EM step; SentencePiece's pruning measures pieces by the same
   Viterbi frequencies). A piece the text never uses scores ``ln(0.5 / total)``, as if used half a
   time: below every used piece (count >= 1), so it wins only where no used piece fits, the role
   the trainer's ``min_score`` gives fallen-out characters.

The counts are integers summed in any order, so they are exact; the scores are computed in Python
from them (``math.log``, the platform's libm). The result differs between two runs only if (a) the
trainer's piece set differs, which needs two pruning candidates whose losses tie within the
~1e-11 jitter (never seen in our measurements), or (b) a word's best segmentation flips to one
into *different* pieces (reordering the same pieces gives the same counts), which needs the two to
score within the jitter of a word's score sum (~1e-10): with score gaps spread over nats that is
about 1e-10 per distinct word, 1e-4 for a corpus of a million distinct words. Quantizing the
trainer's scores instead would not do: a grid fine enough not to change the model (1e-6) is
crossed by 4e-11 jitter with probability 4e-5 per piece, about 1 in a 32k vocabulary. In three
4000-piece trainings on 3 MB (vim release notes plus stdlib ``email`` and ``asyncio``) the
trainer's scores differed as above (2870-3985 pieces) and the recounted ``tokenizer.json`` was
byte-identical.

Quality is unchanged: ``lmforge tokenizer eval`` on held-out text (2.2 MB: other vim release notes,
stdlib ``http`` and ``logging``) gives 2.71757 bytes per token with the trainer's scores and
2.71758 recounted (824,556 vs 824,554 tokens; same vocabulary utilisation); a 1000-piece model
trained on two vim release notes and evaluated on the other two: 2.57857 vs 2.57860. The recount
is one encode pass over the training text (about 1 s per 3 MB, against 15-25 s of training).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)

UNUSED_PIECE_COUNT = 0.5
"""Count (uses) given to a piece the training text never uses: below every used piece (>= 1)."""


def _special_contents(tok) -> set[str]:
    return {t.content for t in tok.get_added_tokens_decoder().values() if t.special}


def canonical_unigram_order(tok) -> None:
    """Reorder a trained Unigram vocabulary in place: special tokens keep their ids, the other pieces follow by text.

    The ids then depend only on the learned piece set, not on the trainer's score order. Other
    models, and vocabularies whose special tokens are not at the front, are left alone.
    """
    from tokenizers import models

    if not isinstance(tok.model, models.Unigram):
        return
    model = json.loads(tok.to_str())["model"]
    vocab = [tuple(v) for v in model["vocab"]]
    special = _special_contents(tok)
    head = [v for v in vocab if v[0] in special]
    if [v[0] for v in vocab[:len(head)]] != [v[0] for v in head]:
        return  # special tokens not at the front: reordering would move their ids
    vocab = head + sorted(vocab[len(head):], key=lambda v: v[0])
    unk_id = None if model["unk_id"] is None else [v[0] for v in vocab].index(model["vocab"][model["unk_id"]][0])
    tok.model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=model.get("byte_fallback", False))


def viterbi_counts(tok, batches: Iterable[list[str]]) -> np.ndarray:
    """How often each id is on ``tok``'s segmentation of the text, special tokens not added.

    Returns:
        ``(tok.get_vocab_size(),)`` int64 counts (tokens).
    """
    size = tok.get_vocab_size()
    counts = np.zeros(size, dtype=np.int64)
    for batch in batches:
        encodings = tok.encode_batch_fast(batch, add_special_tokens=False)
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64)
        counts += np.bincount(ids, minlength=size)[:size]
    return counts


def rescore_unigram(tok, batches: Iterable[list[str]]) -> None:
    """Set every non-special piece's score in place to ``ln(count / total)`` from the Viterbi counts on the text.

    ``batches`` must yield the training text (as the trainer saw it, before normalization).
    Special tokens keep their scores; unused pieces count :data:`UNUSED_PIECE_COUNT`. See the
    module docstring for why and what it guarantees. Other models are left alone.
    """
    from tokenizers import models

    if not isinstance(tok.model, models.Unigram):
        return
    model = json.loads(tok.to_str())["model"]
    counts = viterbi_counts(tok, batches)
    keep = _special_contents(tok) | ({model["vocab"][model["unk_id"]][0]} if model["unk_id"] is not None else set())
    pieces = [i for i, (piece, _) in enumerate(model["vocab"]) if piece not in keep]
    total = int(sum(int(counts[i]) for i in pieces))
    if total == 0:
        return  # nothing to count on (an empty text): keep the trainer's scores
    log_total = math.log(total)
    vocab = [list(v) for v in model["vocab"]]
    for i in pieces:
        vocab[i][1] = math.log(int(counts[i]) or UNUSED_PIECE_COUNT) - log_total
    tok.model = models.Unigram([tuple(v) for v in vocab], unk_id=model["unk_id"],
                               byte_fallback=model.get("byte_fallback", False))
    log.info("unigram scores recounted: %d piece uses, %d of %d pieces unused", total,
             sum(1 for i in pieces if not counts[i]), len(pieces))


def make_reproducible(tok, batches: Iterable[list[str]]) -> None:
    """Canonical ids, then recounted scores (:func:`canonical_unigram_order`, :func:`rescore_unigram`); Unigram only."""
    canonical_unigram_order(tok)
    rescore_unigram(tok, batches)
