"""The corpora, the peers and the token-stream checks of ``bench/bench_prep.py``.

Corpus (:func:`build_corpus`): ``MB`` megabytes (10**6 bytes of UTF-8 text) of the Python standard
library as jsonl, one document per file, in two files ``part-0.jsonl`` and ``part-1.jsonl`` (halves
by bytes, so a peer that parallelises over files has one per worker). Documents that lmforge would
reject (empty or whitespace only) or drop as exact duplicates are left out, and where the stdlib
(~31 MB) is too small it is repeated, each copy after the first opening with a ``# copy K`` line,
so every document is unique and lmforge's token stream can be compared with a peer's one to one.

Peers, each run as a whole process by ``python bench/prep_peers.py METHOD CORPUS_DIR TOKENIZER_DIR OUT
WORKERS``, which prints one :func:`common.result_line` (``in_task_s``: seconds of the timed work,
``tokens``, and the stream digest where there is one):

- ``raw``: ``tokenizers.Tokenizer.encode_batch_fast(texts, add_special_tokens=False)``, lmforge's
  own call, in lmforge's layout (:func:`run_raw`); timed from opening the first file to the last
  ``uint16`` id array, JSON parsing and the EOS appended after each document included;
- ``datatrove``: ``JsonlReader`` (which parses with ``orjson``) + ``DocumentTokenizer`` on a
  ``LocalPipelineExecutor`` (:func:`run_datatrove`), its pool forked as prep's is (with datatrove's
  default ``forkserver`` the workers are not this process's children, and their CPU time is lost);
- ``hf``: ``datasets.load_dataset("json")`` + ``map(tokenize)`` + ``map(group_texts)``, as
  transformers' ``run_clm.py`` does (:func:`run_hf`).

Stream digest (:func:`stream_digest`): the number of stream tokens (document tokens + one EOS each)
and the sha256 of the first ``floor(tokens / seq_len) * seq_len`` of them as little-endian
``uint16``: exactly what lmforge packs into sequences (it drops the last partial one), in corpus
order. :func:`lmforge_digest` and :func:`datatrove_digest` compute it from their outputs.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import common

if TYPE_CHECKING:
    from concurrent.futures import Future
import numpy as np

SEQ_LEN = 1024
BATCH_CHARS = 1 << 20
"""Characters per ``encode_batch_fast`` call: lmforge's bound (``EncodeSpec.encode_batch_chars`` as prep sets it)."""
EOS_TOKEN = "<|endoftext|>"
"""The demo tokenizer's EOS (and BOS: the same id, so lmforge puts no BOS before documents)."""
FILES = ("part-0.jsonl", "part-1.jsonl")
RAW_NAME = ("tokenizers `encode_batch_fast(batch, add_special_tokens=False)`, batches of <= 2^20 chars, "
            "json.loads + EOS per doc inside the timer")
DATATROVE_NAME = ("datatrove 0.10.1 JsonlReader + DocumentTokenizer(eos_token='<|endoftext|>', shuffle_documents=False, "
                  "batch_size=10000: `encode_batch`) on LocalPipelineExecutor(tasks=workers=N, start_method='fork')")
HF_NAME = "datasets load_dataset('json') + map(tokenize) + map(group_texts), num_proc=N (run_clm.py)"


# ---------------------------------------------------------------- corpus

def _unique_texts() -> list[str]:
    """The stdlib documents lmforge keeps: not blank, first occurrence of each normalised text."""
    from data_prep.dedup import text_hashes

    texts = [t for t in common.stdlib_texts() if t.strip()]
    _, first = np.unique(text_hashes(texts), return_index=True)
    return [texts[i] for i in sorted(first.tolist())]


def build_corpus(work: Path, mb: float) -> Path:
    """The folder of the ``mb``-MB corpus (:data:`FILES`, see the module docstring), built once under ``work``."""
    def build(tmp: Path) -> None:
        base, kept, size, copy = _unique_texts(), [], 0, 0
        while size < mb * 1e6:
            for text in base:
                if size >= mb * 1e6:
                    break
                text = text if copy == 0 else f"# copy {copy}\n{text}"
                kept.append(text)
                size += len(text.encode("utf-8"))
            copy += 1
        sizes = np.cumsum([len(t.encode("utf-8")) for t in kept])
        half = int(np.searchsorted(sizes, sizes[-1] / 2))
        common.write_jsonl(tmp / FILES[0], kept[:half])
        common.write_jsonl(tmp / FILES[1], kept[half:])

    return common.cached_build(work / f"corpus-{mb:g}mb", build)


def corpus_files(folder: Path | str) -> list[str]:
    return [str(Path(folder) / f) for f in FILES]


# ---------------------------------------------------------------- stream digests

class Digest:
    """:func:`stream_digest` fed piece by piece: hashes whole sequences of :data:`SEQ_LEN` tokens as they fill."""

    def __init__(self) -> None:
        self.sha, self.tokens, self.pending = hashlib.sha256(), 0, np.empty(0, dtype=np.uint16)

    def add(self, ids: np.ndarray) -> None:
        ids = np.concatenate([self.pending, ids.astype(np.uint16, copy=False)])
        whole = len(ids) // SEQ_LEN * SEQ_LEN
        self.sha.update(ids[:whole].astype("<u2").tobytes())
        self.pending, self.tokens = ids[whole:], self.tokens + whole

    def result(self) -> dict:
        return {"tokens": self.tokens + len(self.pending), "sha256": self.sha.hexdigest()}


def stream_digest(pieces: Sequence[np.ndarray]) -> dict:
    """``{"tokens", "sha256"}`` of the concatenated ``pieces`` (see the module docstring)."""
    digest = Digest()
    for piece in pieces:
        digest.add(piece)
    return digest.result()


def lmforge_digest(data_dir: Path | str) -> dict:
    """The digest of what ``lmforge prep`` wrote to ``data_dir`` (train split; run with ``--val-fraction 0``):
    its packed rows in order, and the stream's token count from the manifest."""
    from data_prep.shards import ShardReader, read_manifest

    manifest = read_manifest(data_dir)
    if manifest["counts"]["documents"] != manifest["splits"]["train"]["documents"]:
        raise RuntimeError(f"{data_dir}: documents in the val split; the comparison needs --val-fraction 0")
    reader, digest = ShardReader(data_dir, "train"), Digest()
    for start in range(0, len(reader), 4096):
        digest.add(reader.batch(np.arange(start, min(start + 4096, len(reader)))).reshape(-1))
    if digest.pending.size:
        raise RuntimeError(f"{data_dir}: packed rows are not whole sequences of {SEQ_LEN}")
    return {"tokens": int(manifest["counts"]["tokens"]), "sha256": digest.sha.hexdigest()}


def datatrove_digest(out: Path | str, tasks: int) -> dict:
    """The digest of datatrove's ``RRRRR_unshuffled.ds`` files (``uint16`` tokens), ranks in order."""
    return stream_digest([np.fromfile(Path(out) / f"{rank:05d}_unshuffled.ds", dtype="<u2") for rank in range(tasks)])


# ---------------------------------------------------------------- raw tokenizers peer

def _blocks(paths: Sequence[str], block_bytes: int) -> Iterator[bytes]:
    """``block_bytes`` of jsonl at a time, extended to the end of the line (as lmforge's reader cuts them)."""
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(block_bytes):
                yield block + fh.readline()


def _encode_block(tok_file: str, eos: int, payload: bytes) -> np.ndarray:
    """The ``uint16`` ids of one block's documents, each followed by ``eos``."""
    from data_prep.encode import load_tokenizer_file

    tok = load_tokenizer_file(tok_file)
    texts = [json.loads(line)["text"] for line in payload.split(b"\n") if line]
    ids: list[int] = []
    start = 0
    while start < len(texts):
        end, chars = start + 1, len(texts[start])
        while end < len(texts) and chars + len(texts[end]) <= BATCH_CHARS:
            chars, end = chars + len(texts[end]), end + 1
        for enc in tok.encode_batch_fast(texts[start:end], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos)
        start = end
    return np.array(ids, dtype=np.uint16)


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # what lmforge's workers do when workers == cores


def run_raw(paths: Sequence[str], tok_dir: str, workers: int) -> dict:
    """The raw peer in lmforge's layout: ``workers <= 1`` in this process (the tokenizers thread pool at
    its default, every core, as lmforge leaves it); else the main process reads 1 MiB blocks and a fork
    ``ProcessPoolExecutor`` of ``workers`` encodes them, one tokenizers thread each, at most
    ``2 * workers + 2`` in flight, results in order. Timed: pool start, reading, parsing, encoding, ids."""
    import functools
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from data_prep.encode import load_tokenizer_file
    from data_prep.reader import DEFAULT_BLOCK_BYTES

    tok_file = str(Path(tok_dir) / "tokenizer.json")
    eos = load_tokenizer_file(tok_file).token_to_id(EOS_TOKEN)  # loaded (and cached) before the clock, as in prep
    encode = functools.partial(_encode_block, tok_file, eos)
    cpu, start = common.cpu_seconds(True), time.perf_counter()
    if workers <= 1:
        pieces = [encode(block) for block in _blocks(paths, DEFAULT_BLOCK_BYTES)]
    else:
        window: collections.deque[Future] = collections.deque()
        pieces = []
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker) as pool:
            for block in _blocks(paths, DEFAULT_BLOCK_BYTES):
                window.append(pool.submit(encode, block))
                if len(window) >= 2 * workers + 2:
                    pieces.append(window.popleft().result())
            pieces += [f.result() for f in window]
    elapsed, cpu = time.perf_counter() - start, common.cpu_seconds(True) - cpu
    return {"in_task_s": elapsed, "in_task_cpu_s": cpu, **stream_digest(pieces)}


# ---------------------------------------------------------------- datatrove and datasets peers

def run_datatrove(corpus_dir: str, tok_dir: str, out: str, workers: int) -> dict:
    """datatrove's tokenization step (:data:`DATATROVE_NAME`) writing ``out``; timed: ``executor.run()``.
    Its digest is taken from ``out`` afterwards, by the parent (:func:`datatrove_digest`)."""
    import shutil

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    shutil.rmtree(out, ignore_errors=True)
    pipeline = [JsonlReader(corpus_dir, glob_pattern="part-*.jsonl", text_key="text"),
                DocumentTokenizer(output_folder=out, tokenizer_name_or_path=str(Path(tok_dir) / "tokenizer.json"),
                                  eos_token=EOS_TOKEN, shuffle_documents=False)]
    executor = LocalPipelineExecutor(pipeline, tasks=max(workers, 1), workers=max(workers, 1),
                                     logging_dir=str(Path(out) / "logs"), skip_completed=False, start_method="fork")
    cpu, start = common.cpu_seconds(True), time.perf_counter()
    executor.run()
    elapsed, cpu = time.perf_counter() - start, common.cpu_seconds(True) - cpu
    return {"in_task_s": elapsed, "in_task_cpu_s": cpu}


def run_hf(paths: Sequence[str], tok_dir: str, out: str, workers: int) -> dict:
    """The ``run_clm.py`` pipeline with a fresh cache folder ``out``; timed: load, both maps. Its stream has no
    EOS (the tokenizer's post-processor adds none), so it is not compared with lmforge's."""
    import shutil
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    shutil.rmtree(out, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    num_proc = workers if workers > 1 else None

    def tokenize(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):  # transformers/examples/pytorch/language-modeling/run_clm.py
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(concatenated[list(examples.keys())[0]]) // SEQ_LEN) * SEQ_LEN
        result = {k: [t[i: i + SEQ_LEN] for i in range(0, total, SEQ_LEN)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    cpu, start = common.cpu_seconds(True), time.perf_counter()
    ds = datasets.load_dataset("json", data_files=list(paths), split="train", cache_dir=out)
    ds = ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])
    ds = ds.map(group_texts, batched=True, num_proc=num_proc)
    elapsed, cpu = time.perf_counter() - start, common.cpu_seconds(True) - cpu
    return {"in_task_s": elapsed, "in_task_cpu_s": cpu, "tokens": len(ds) * SEQ_LEN, "sequences": len(ds)}


def main(argv: list[str]) -> int:
    """``METHOD CORPUS_DIR TOKENIZER_DIR OUT WORKERS``: run one peer trial, print its result line."""
    method, corpus_dir, tok_dir, out, workers = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    if method == "raw":
        result = run_raw(corpus_files(corpus_dir), tok_dir, workers)
    elif method == "datatrove":
        result = run_datatrove(corpus_dir, tok_dir, out, workers)
    elif method == "hf":
        result = run_hf(corpus_files(corpus_dir), tok_dir, out, workers)
    else:
        raise SystemExit(f"unknown peer {method!r}")
    print(common.result_line(result), flush=True)
    return 0


if __name__ == "__main__":
    common.use_this_checkout()
    sys.exit(main(sys.argv[1:]))
