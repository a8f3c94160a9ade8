"""Near-duplicate removal at prep with datatrove's MinHash deduplication (``lmforge prep --near-dedup``).

The four datatrove stages (``MinhashDedupSignature``, ``MinhashDedupBuckets``, ``MinhashDedupCluster``,
``MinhashDedupFilter``; the FineWeb recipe) run in this process with ``LocalPipelineExecutor(workers=1)``
over every document of this task's share of the corpus, in corpus order, before tokenizing; so the
documents kept do not depend on ``--workers``. In each cluster of near duplicates datatrove keeps one
document and drops the others. With several tasks (a Slurm array) each task deduplicates its own
share only: near duplicates in two tasks' shares are both kept (exact duplicates are still dropped
across tasks, :mod:`data_prep.dedup`).

Documents are compared by word n-grams (``n_grams``) of datatrove's simplified text (lower case,
punctuation and digits normalised), words split at whitespace (datatrove's default English word
tokenizer needs spaCy; whitespace works for any language that spaces its words). Two documents are
candidates when all ``hashes_per_bucket`` MinHashes of one of ``buckets`` bands agree: the LSH
S-curve crosses 1/2 near Jaccard similarity ``(1 / buckets) ** (1 / hashes_per_bucket)`` (Leskovec,
Rajaraman and Ullman, *Mining of Massive Datasets*, ch. 3.4), recorded as ``threshold``. Defaults
are datatrove's (5-grams, 14 buckets of 8 hashes: 0.72); n-grams are hashed with 64-bit SHA-1
(datatrove's ``hash_fc="sha1"``: its default xxhash path needs ``xxhash<4``, which ``datasets``' newer
``xxhash`` breaks). The signatures are written under a
temporary folder removed afterwards; the pass runs on one core (datatrove computes signatures in
Python), about the cost of tokenizing.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data_prep.errors import UserError
from data_prep.reader import Block, parse_block

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lmforge[dedup]'"
"""How to get datatrove (the ``dedup`` extra of setup.py)."""


@dataclass(frozen=True)
class NearDedupParams:
    """datatrove ``MinhashConfig`` fields; the manifest records them with the resulting threshold."""

    n_grams: int = 5
    """Words per shingle."""
    buckets: int = 14
    """LSH bands (datatrove ``num_buckets``)."""
    hashes_per_bucket: int = 8
    """MinHashes per band."""
    seed: int = 1
    """Seeds the MinHash permutations (datatrove's default)."""

    @property
    def threshold(self) -> float:
        """Jaccard similarity at which a pair is found with probability about 1/2: ``(1/b) ** (1/r)``."""
        return (1.0 / self.buckets) ** (1.0 / self.hashes_per_bucket)

    def record(self, removed: int) -> dict:
        """The manifest's ``near_dedup`` entry."""
        return {"library": "datatrove MinHash", "n_grams": self.n_grams, "buckets": self.buckets,
                "hashes_per_bucket": self.hashes_per_bucket, "seed": self.seed,
                "threshold": round(self.threshold, 4), "removed": removed}


def require_datatrove() -> None:
    """Raises:
        UserError: datatrove is not installed (one line naming the extra)."""
    if importlib.util.find_spec("datatrove") is None:
        raise UserError(f"prep --near-dedup: datatrove is not installed ({INSTALL_HINT})")


def _whitespace_tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceTokenizer(WordTokenizer):
        """Words at whitespace: no spaCy or NLTK model needed (nothing to download)."""

        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            raise NotImplementedError("not used by MinHash deduplication")

    return WhitespaceTokenizer()


def near_duplicate_keep(texts: Iterable[str], params: NearDedupParams, work_dir: Path) -> np.ndarray:
    """``(N,)`` bool over ``texts`` in order: False for a near duplicate datatrove's MinHash stages drop.

    Raises:
        UserError: datatrove is not installed.
    """
    require_datatrove()
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig

    config = MinhashConfig(n_grams=params.n_grams, num_buckets=params.buckets, hashes_per_bucket=params.hashes_per_bucket,
                           seed=params.seed, hash_config=HashConfig(precision=64, hash_fc="sha1"))
    count = [0]

    def documents(data, rank: int = 0, world_size: int = 1) -> Iterator:
        for i, text in enumerate(texts):
            count[0] = i + 1
            yield Document(text=text, id=str(i))

    kept: list[int] = []

    def ids_only(data, rank: int = 0, world_size: int = 1) -> Iterator:  # stage 4 matches documents by position only
        yield from (Document(text="", id=str(i)) for i in range(count[0]))

    def collect(data, rank: int = 0, world_size: int = 1) -> Iterator:
        for doc in data:
            kept.append(int(doc.id))
            yield doc

    sigs, buckets, remove, logs = (str(work_dir / d) for d in ("signatures", "buckets", "remove", "logs"))
    stages = [([documents, MinhashDedupSignature(sigs, config, language=_whitespace_tokenizer())], 1),
              ([MinhashDedupBuckets(sigs, buckets, config=config)], params.buckets),
              ([MinhashDedupCluster(buckets, remove, config=config)], 1),
              ([ids_only, MinhashDedupFilter(remove), collect], 1)]
    for n, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=f"{logs}/{n}", skip_completed=False).run()
    keep = np.zeros(count[0], dtype=bool)
    keep[np.asarray(kept, dtype=np.int64)] = True
    return keep


def near_keep_masks(blocks: Iterable[Block], exact_masks: list[np.ndarray] | None, text_column: str,
                    params: NearDedupParams, parts_dir: Path) -> tuple[list[np.ndarray], dict[str, int]]:
    """Per block, in read order: the documents to keep after exact (``exact_masks``, None: all) and near
    deduplication; and the near duplicates dropped per source. Parses every block in this process (one
    pass) and keeps the documents' texts out of memory (a generator feeds datatrove).

    Raises:
        UserError: datatrove is not installed.
    """
    sizes: list[tuple[str, np.ndarray]] = []

    def texts() -> Iterator[str]:
        for k, block in enumerate(blocks):
            docs = parse_block(block, text_column).texts
            exact = np.ones(len(docs), dtype=bool) if exact_masks is None else exact_masks[k]
            sizes.append((block.source, exact))
            yield from (t for t, keep in zip(docs, exact) if keep)

    work_dir = Path(tempfile.mkdtemp(prefix="near-dedup-", dir=parts_dir))
    try:
        keep = near_duplicate_keep(texts(), params, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    masks: list[np.ndarray] = []
    dropped: dict[str, int] = {}
    pos = 0
    for source, exact in sizes:
        mask = exact.copy()
        n = int(exact.sum())
        mask[np.flatnonzero(exact)] = keep[pos:pos + n]
        pos += n
        if (lost := n - int(mask.sum())):
            dropped[source] = dropped.get(source, 0) + lost
        masks.append(mask)
    return masks, dropped
