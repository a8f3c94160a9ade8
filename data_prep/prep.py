"""``lmforge prep``: read a corpus, tokenize it, pack it and write Arrow shards plus a manifest.

One call runs one *task* (``task_id`` of ``num_tasks``; a Slurm job array runs one per array
element) over its share of the corpus (:func:`data_prep.sources.plan_segments`):

1. the main process reads blocks (:mod:`data_prep.reader`), worker processes parse and tokenize
   them (:mod:`data_prep.encode`), and the main process packs each split's stream in corpus order
   (:mod:`data_prep.pack`) into ``<split>/part-TTTTT-*.arrow`` shards (:mod:`data_prep.shards`);
2. the task writes its rejects and then its completion marker ``parts/part-TTTTT.json``; a rerun
   with the same plan skips a task whose marker exists;
3. the task that finds every marker present merges (:mod:`data_prep.merge`): it packs the tasks'
   partial last rows together, writes ``rejects.jsonl`` and, last, ``manifest.json``.

The validation split is chosen per document by a hash of its text, so the same text always lands
in the same split (no leakage, deterministic whatever the order of the inputs). The shard bytes
do not depend on the worker count; with several tasks the counts in the manifest equal the
single-task counts (only the order of sequences differs).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep import dedup, near_dedup
from data_prep import merge as merge_mod
from data_prep.encode import SPLITS, Encoded, EncodeSpec, default_workers, encode_blocks, is_validation  # noqa: F401 (re-export)
from data_prep.errors import UserError
from data_prep.fim import FIM_REQUIRED, FimSpec
from data_prep.pack import TAIL_MODES, Framing, StreamPacker
from data_prep.reader import DEFAULT_BLOCK_BYTES, Block, RejectLog, read_blocks
from data_prep.shards import MANIFEST_NAME, ShardWriter, token_dtype
from data_prep.sources import TEXT_MODES, Segment, Source, plan_segments, resolve_sources
from data_prep.stats import doc_length_counts
from data_prep.tokenizer.folder import TOKENIZER_FILE
from data_prep.tokenizer.ids import tokenizer_info
from lmforge_common import write_json_atomic

log = logging.getLogger(__name__)
OBJECTIVES = ("clm", "mlm")
RUNTIME_FIELDS = ("task_id", "workers", "overwrite", "show_progress", "merge", "block_bytes")


@dataclass
class PrepConfig:
    """Configuration of one prep task."""

    inputs: list[str]
    """Corpus paths, globs, folders, ``stdlib`` or ``hf:NAME[:CONFIG][@SPLIT]`` (see :mod:`data_prep.sources`)."""
    tokenizer: str
    """Folder of a saved tokenizer (``tokenizer.json`` inside)."""
    output: str
    """Folder to write shards, rejects and manifest into."""
    seq_len: int = 512
    """Tokens per packed sequence, framing tokens included."""
    val_fraction: float = 0.005
    """Fraction of documents (by content hash) held out for validation, in [0, 1)."""
    text_column: str = "text"
    """Field of jsonl / parquet / Arrow / Hub records that holds the text."""
    text_mode: str = "file"
    """Plain-text files: ``file`` (one document per file) or ``line`` (one per non-blank line)."""
    objective: str = "clm"
    """``clm`` (EOS after each document) or ``mlm`` (sequences framed by the tokenizer's post-processor)."""
    fim_rate: float = 0.0
    """Fraction of documents rearranged for fill-in-the-middle before tokenizing, in [0, 1] (data_prep.fim;
    Bavarian et al. 2022); needs a tokenizer trained with ``--fim``."""
    fim_spm_rate: float = 0.5
    """Of the FIM documents, the fraction in SPM order, the rest PSM (StarCoder: 0.5)."""
    dedup: bool = True
    """Drop a document whose normalised text occurred earlier in corpus order (exact duplicates,
    :mod:`data_prep.dedup`)."""
    near_dedup: bool = False
    """Also drop near duplicates with datatrove's MinHash deduplication over this task's documents, before
    tokenizing (:mod:`data_prep.near_dedup`; needs ``pip install 'lmforge[dedup]'``)."""
    near_dedup_ngrams: int = 5
    """Near dedup: words per shingle (datatrove's default)."""
    near_dedup_buckets: int = 14
    """Near dedup: LSH bands (datatrove's default); threshold ~ ``(1/buckets) ** (1/hashes_per_bucket)``."""
    near_dedup_hashes_per_bucket: int = 8
    """Near dedup: MinHashes per band (datatrove's default)."""
    tail: str = "drop"
    """The last partial sequence of each split: ``drop`` it, or ``pad`` it (``num_tokens`` marks real tokens)."""
    workers: int | None = None
    """Worker processes that parse and tokenize; ``None``: one per usable CPU; ``<= 1``: in this process."""
    num_tasks: int = 1
    """Tasks the corpus is split into (Slurm job-array size)."""
    task_id: int = 0
    """This task's index in ``[0, num_tasks)``."""
    sequences_per_shard: int = 16384
    """Packed sequences per Arrow shard."""
    block_bytes: int = DEFAULT_BLOCK_BYTES
    """Bytes of input per block handed to a worker."""
    max_piece_chars: int = 1 << 16
    """Documents longer than this (characters) are tokenized in pieces, in bounded memory."""
    overwrite: bool = False
    """Replace an existing prepared folder (or this task's part) instead of refusing."""
    merge: bool = True
    """Merge the parts and write the manifest when this task finds every task finished."""
    show_progress: bool = True
    """Show a tqdm bar with docs/s, tokens/s and MB/s."""

    def validate(self) -> None:
        """Raise one :class:`UserError` listing every invalid field."""
        problems = []
        if self.seq_len < 2:
            problems.append(f"seq_len={self.seq_len} must be >= 2 tokens")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction={self.val_fraction} must be in [0, 1)")
        for name, allowed in (("text_mode", TEXT_MODES), ("objective", OBJECTIVES), ("tail", TAIL_MODES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {', '.join(allowed)}")
        if self.num_tasks < 1:
            problems.append(f"num_tasks={self.num_tasks} must be >= 1")
        elif not 0 <= self.task_id < self.num_tasks:
            problems.append(f"task_id={self.task_id} must be in [0, {self.num_tasks})")
        for name in ("sequences_per_shard", "block_bytes", "max_piece_chars", "near_dedup_ngrams", "near_dedup_buckets",
                     "near_dedup_hashes_per_bucket"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        problems += FimSpec(self.fim_rate, self.fim_spm_rate).problems()
        if self.near_dedup and importlib.util.find_spec("datatrove") is None:
            problems.append(f"near_dedup needs datatrove, which is not installed ({near_dedup.INSTALL_HINT})")
        if problems:
            raise UserError("prep config: " + "; ".join(problems))


def near_params(cfg: PrepConfig) -> near_dedup.NearDedupParams:
    """The MinHash parameters of ``cfg`` (``near_dedup_*`` fields)."""
    return near_dedup.NearDedupParams(cfg.near_dedup_ngrams, cfg.near_dedup_buckets, cfg.near_dedup_hashes_per_bucket)


@dataclass
class _Setup:
    """Everything a task derives from the config before reading: ids, framing, plan."""

    tokenizer: dict
    dtype: np.dtype
    framing: Framing
    doc_prefix: tuple[int, ...]
    doc_suffix: tuple[int, ...]
    sources: list[Source]
    plan: str = ""
    """sha256 of the config (runtime fields aside), tokenizer fingerprint and source sizes."""
    fim: FimSpec | None = None
    fim_ids: tuple[int, int, int] = (-1, -1, -1)


def _post_processor_framing(tokenizer_dir: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens the tokenizer's post-processor puts before and after a single sequence."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / TOKENIZER_FILE))
    tok.no_padding()
    tok.no_truncation()
    enc = tok.encode("a", add_special_tokens=True)
    mask = enc.special_tokens_mask
    if 0 not in mask:
        raise UserError(f"{tokenizer_dir}: cannot find the text in the post-processor's output {enc.tokens}")
    first, last = mask.index(0), len(mask) - mask[::-1].index(0)
    return tuple(enc.ids[:first]), tuple(enc.ids[last:])


def _setup(cfg: PrepConfig) -> _Setup:
    info = tokenizer_info(cfg.tokenizer)
    tok = {"fingerprint": info.fingerprint, "vocab_size": info.vocab_size, "eos_token_id": info.eos_token_id,
           "bos_token_id": info.bos_token_id, "pad_token_id": info.pad_token_id}
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    doc_prefix: tuple[int, ...]
    doc_suffix: tuple[int, ...]
    pad_id: int | None
    if cfg.objective == "clm":
        if info.eos_token_id is None:
            raise UserError(f"{cfg.tokenizer}: tokenizer defines no eos token; packing needs one to mark document ends")
        prefix, suffix = (), ()
        bos = info.bos_token_id
        doc_prefix = (bos,) if bos is not None and bos != info.eos_token_id else ()
        doc_suffix = (info.eos_token_id,)
        pad_id = info.pad_token_id if info.pad_token_id is not None else info.eos_token_id
    else:
        prefix, suffix = _post_processor_framing(cfg.tokenizer)
        if not prefix and not suffix:
            raise UserError(f"{cfg.tokenizer}: the tokenizer's post-processor adds no special token; "
                            "objective mlm needs a template such as [CLS] $A [SEP]")
        doc_prefix, doc_suffix = (), suffix[-1:]
        pad_id = info.pad_token_id
        if pad_id is None and cfg.tail == "pad":
            raise UserError(f"{cfg.tokenizer}: tail=pad needs a pad token, and this tokenizer defines none")
    framing = Framing(cfg.seq_len, prefix, suffix, pad_id)
    if framing.row_tokens < 2:
        raise UserError(f"prep config: seq_len={cfg.seq_len} leaves {framing.row_tokens} tokens per sequence after "
                        f"{len(prefix) + len(suffix)} framing tokens; need >= 2")
    sources = resolve_sources(cfg.inputs)
    setup = _Setup(tok, token_dtype(info.vocab_size), framing, doc_prefix, doc_suffix, sources)
    if cfg.fim_rate > 0:
        setup.fim, setup.fim_ids = FimSpec(cfg.fim_rate, cfg.fim_spm_rate), _fim_ids(cfg.tokenizer)
        tok["fim_token_ids"] = dict(zip(FIM_REQUIRED, setup.fim_ids))
    plan = {"config": {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}, "tokenizer": info.fingerprint,
            "sources": [(s.path, s.size_bytes) for s in sources]}
    setup.plan = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    return setup


def _fim_ids(tokenizer_dir: str) -> tuple[int, int, int]:
    """Ids of the three FIM sentinels, which must be special tokens of the tokenizer.

    Raises:
        UserError: one or more sentinels are missing (the message names them and the fix).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / TOKENIZER_FILE))
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    missing = [t for t in FIM_REQUIRED if t not in special]
    if missing:
        raise UserError(f"{tokenizer_dir}: --fim-rate needs the FIM sentinels as special tokens, and {', '.join(missing)} "
                        "are not; train the tokenizer with `lmforge tokenizer train --fim`")
    return special[FIM_REQUIRED[0]], special[FIM_REQUIRED[1]], special[FIM_REQUIRED[2]]


def _clean_task_outputs(out: Path, cfg: PrepConfig) -> None:
    """Remove what an earlier (crashed or overwritten) run of this task left; the whole folder for one task."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the folder is not complete
    if cfg.num_tasks == 1:
        for name in (*SPLITS, merge_mod.PARTS_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (merge_mod.REJECTS_NAME, merge_mod.DATASET_DICT):
            (out / name).unlink(missing_ok=True)
        return
    for path in merge_mod.task_files(out, cfg.task_id):
        path.unlink(missing_ok=True)


def _check_existing(out: Path, cfg: PrepConfig, plan: str) -> str:
    """``done`` (whole folder complete for this plan), ``task-done`` (this task's part exists) or ``run``.

    Raises:
        UserError: without ``overwrite``, the folder holds a dataset or parts of another plan.
    """
    manifest = out / MANIFEST_NAME
    if manifest.exists() and not cfg.overwrite:
        if json.loads(manifest.read_text(encoding="utf-8")).get("plan") == plan:
            return "done"
        raise UserError(f"{out}: already holds a prepared dataset ({MANIFEST_NAME}) from another config or corpus; "
                        "pass --overwrite to replace it")
    if not cfg.overwrite:
        for path in sorted((out / merge_mod.PARTS_DIR).glob("part-*.json")):
            if json.loads(path.read_text(encoding="utf-8")).get("plan") != plan:
                raise UserError(f"{path}: a part prepared from another config or corpus; pass --overwrite to replace it")
    marker = merge_mod.marker_path(out, cfg.task_id)
    return "task-done" if marker.exists() and not cfg.overwrite else "run"


def prepare(cfg: PrepConfig) -> dict | None:
    """Run task ``cfg.task_id``; merge when every task has finished.

    Returns the manifest written to ``cfg.output/manifest.json``, or ``None`` while other tasks
    are unfinished (or ``cfg.merge`` is off).

    Raises:
        UserError: invalid config or tokenizer, or an output prepared from another config
            without ``overwrite``.
        InputError: missing / unreadable inputs, a text column absent from a whole file, or no
            usable document in the whole corpus (the manifest is not written).
    """
    cfg.validate()
    setup = _setup(cfg)
    out = Path(cfg.output)
    state = _check_existing(out, cfg, setup.plan)
    if state == "done":
        log.info("prep: %s is already complete for this config and corpus; nothing to do", out)
        return json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    if state == "task-done":
        log.info("prep: task %d of %d already finished (%s); skipping it", cfg.task_id, cfg.num_tasks,
                 merge_mod.marker_path(out, cfg.task_id))
    else:
        _clean_task_outputs(out, cfg)
        out.mkdir(parents=True, exist_ok=True)
        _run_task(cfg, setup, out)
    return merge_mod.merge_if_complete(out, setup.plan) if cfg.merge else None


class _Progress:
    """tqdm over input bytes with docs/s, tokens/s and MB/s; counts only (no tqdm import) when disabled."""

    def __init__(self, total_bytes: int | None, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm  # about 0.1 s of imports (asyncio): only for a bar that is shown

            self.bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc=desc,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        self.start = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs, self.tokens, self.bytes = self.docs + docs, self.tokens + tokens, self.bytes + nbytes
        if self.bar is not None:
            dt = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt / 1e6:.2f}M tokens/s, "
                                     f"{self.bytes / dt / 1e6:.1f} MB/s", refresh=False)
            self.bar.update(nbytes)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.start


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""Write errors of a full or limited file system: no space, quota exceeded, file size limit (RLIMIT_FSIZE)."""


class PrepWriteError(UserError):
    """Prep could not write its output (disk full, quota, file size limit); no manifest was written."""


def _write_failure_line(out: Path, exc: OSError, input_bytes_read: int, input_bytes_total: int | None) -> str:
    """One line: the folder, the error, the bytes the output needs (what was written so far, scaled by the
    share of the input read) and the bytes free."""
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    needed = (f"about {round(written * input_bytes_total / input_bytes_read)} bytes (extrapolated from {written} bytes "
              f"for {input_bytes_read} of {input_bytes_total} input bytes)" if input_bytes_total and input_bytes_read
              else f"more than the {written} bytes written")
    return (f"{out}: prep could not write its shards ({exc.strerror}): it needs {needed}, "
            f"{shutil.disk_usage(out).free} bytes free on that file system (or a quota / file size limit); "
            "no manifest was written")


class _SplitPacking:
    """One task's packing of every split: stream packers, shard writers, document-length histograms, text bytes."""

    def __init__(self, cfg: PrepConfig, setup: _Setup, out: Path):
        name = merge_mod.part_name(cfg.task_id)
        self.framing, self.dtype = setup.framing, setup.dtype
        self.packers = {s: StreamPacker(setup.framing.row_tokens, setup.dtype) for s in SPLITS}
        self.writers = {s: ShardWriter(out, s, cfg.seq_len, setup.dtype, name, cfg.sequences_per_shard) for s in SPLITS}
        self.hist = {s: np.zeros(0, dtype=np.int64) for s in SPLITS}
        self.text_bytes = dict.fromkeys(SPLITS, 0)

    def add(self, enc: Encoded) -> None:
        """Pack one encoded block's streams into full rows, write them and count its documents."""
        for s in SPLITS:
            rows, offsets, starts = self.packers[s].add(enc.streams[s], enc.doc_lengths[s])
            self.writers[s].add(self.framing.frame(rows, offsets, starts, self.dtype))
            self.hist[s] = doc_length_counts(enc.doc_lengths[s], self.hist[s])
            self.text_bytes[s] += enc.text_bytes[s]

    def close(self) -> dict[str, list[dict]]:
        """Close the shard writers; each split's shard records."""
        return {s: self.writers[s].close() for s in SPLITS}

    def parts(self, shards: dict[str, list[dict]]) -> dict[str, dict]:
        """Each split's entry of the task marker: counts, shards, partial last row (tail), length histogram."""
        splits = {}
        for s in SPLITS:
            tail_tokens, tail_starts = self.packers[s].take_tail()
            p = self.packers[s]
            splits[s] = {"documents": p.documents, "tokens": p.tokens, "rows": p.rows, "shards": shards[s],
                         "tail_tokens": tail_tokens.tolist(), "tail_starts": tail_starts.tolist(),
                         "doc_length_counts": self.hist[s].tolist(), "text_bytes": self.text_bytes[s]}
        return splits


def _encode_spec(cfg: PrepConfig, setup: _Setup) -> EncodeSpec:
    """What the workers need to tokenize this task's blocks."""
    return EncodeSpec(str(Path(cfg.tokenizer) / TOKENIZER_FILE), cfg.text_column, cfg.val_fraction, setup.doc_prefix,
                      setup.doc_suffix, setup.dtype.name, cfg.max_piece_chars, max(cfg.max_piece_chars, 1 << 20),
                      setup.fim, setup.fim_ids)


def _read_task_blocks(cfg: PrepConfig, segments: list[Segment]) -> Iterator[Block]:
    """The blocks of this task's segments in corpus order, read lazily."""
    return (b for seg in segments for b in read_blocks(seg, cfg.text_column, cfg.text_mode, cfg.block_bytes))


def _task_workers(cfg: PrepConfig, segments: list[Segment], hub: bool) -> int:
    """Worker processes for this task: ``cfg.workers`` (default one per CPU), no more than a small input has blocks."""
    workers = cfg.workers if cfg.workers is not None else default_workers()
    if not hub and not any(seg.source.compressed for seg in segments):  # a small input: no idle workers to start
        workers = min(workers, max(1, -(-sum(seg.nbytes for seg in segments) // cfg.block_bytes)))
    return workers


def _deduplicated_blocks(cfg: PrepConfig, setup: _Setup, out: Path, segments: list[Segment],
                         workers: int) -> tuple[Iterator[Block], dict[str, int], dict[str, int]]:
    """The task's blocks with the exact and near duplicates masked out, and the duplicates and near duplicates per source."""
    blocks = _read_task_blocks(cfg, segments)
    duplicates: dict[str, int] = {}
    near: dict[str, int] = {}
    masks: list[np.ndarray] | None = None
    if cfg.dedup:
        start = time.perf_counter()
        masks, duplicates = dedup.keep_masks(setup.sources, cfg, setup.plan, out / merge_mod.PARTS_DIR, workers)
        log.info("prep task %d/%d: dedup hash pass %.1f s, %d duplicates", cfg.task_id, cfg.num_tasks,
                 time.perf_counter() - start, sum(duplicates.values()))
    if cfg.near_dedup:
        start = time.perf_counter()
        masks, near = near_dedup.near_keep_masks(blocks, masks, cfg.text_column, near_params(cfg), out / merge_mod.PARTS_DIR)
        blocks = _read_task_blocks(cfg, segments)
        log.info("prep task %d/%d: near-dedup MinHash pass %.1f s, %d near duplicates", cfg.task_id, cfg.num_tasks,
                 time.perf_counter() - start, sum(near.values()))
    if masks is not None:
        blocks = (dataclasses.replace(b, keep=m) for b, m in zip(blocks, masks, strict=True))
    return blocks, duplicates, near


def _encode_and_pack(out: Path, blocks: Iterator[Block], spec: EncodeSpec, workers: int, packing: _SplitPacking,
                     rejects: RejectLog, progress: _Progress, total_bytes: int | None) -> tuple[dict[str, list[dict]], float]:
    """Tokenize the blocks in workers and pack them into shards; the shards per split and the seconds elapsed.

    Raises:
        PrepWriteError: the file system is full or limited (the rejects file is discarded).
    """
    try:
        for enc in encode_blocks(blocks, spec, workers):
            rejects.add_many(enc.source, enc.rejects)
            packing.add(enc)
            progress.update(sum(len(v) for v in enc.doc_lengths.values()), sum(len(v) for v in enc.streams.values()),
                            enc.input_bytes)
        shards = packing.close()
    except OSError as exc:
        rejects.abort()
        if exc.errno not in STORAGE_ERRNOS:
            raise
        raise PrepWriteError(_write_failure_line(out, exc, progress.bytes, total_bytes)) from exc
    except BaseException:
        rejects.abort()
        raise
    finally:
        elapsed_s = progress.close()
    rejects.close()
    return shards, elapsed_s


def _task_marker(cfg: PrepConfig, setup: _Setup, splits: dict[str, dict], progress: _Progress, elapsed_s: float,
                 workers: int, rejects: RejectLog, duplicates: dict[str, int], near: dict[str, int]) -> dict:
    """The completion marker ``parts/part-TTTTT.json`` of this task (what :mod:`data_prep.merge` reads)."""
    fr = setup.framing
    return {
        "format": merge_mod.PART_FORMAT, "plan": setup.plan, "task_id": cfg.task_id, "num_tasks": cfg.num_tasks,
        "config": {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS},
        "tokenizer": setup.tokenizer, "token_dtype": setup.dtype.name,
        "framing": {"document_prefix_ids": list(setup.doc_prefix), "document_suffix_ids": list(setup.doc_suffix),
                    "sequence_prefix_ids": list(fr.prefix), "sequence_suffix_ids": list(fr.suffix), "pad_token_id": fr.pad_id},
        "sources": [s.path for s in setup.sources],
        "input_bytes": progress.bytes, "elapsed_s": round(elapsed_s, 3), "workers": workers,
        "rejects": rejects.total, "rejects_by_reason": dict(rejects.kinds), "splits": splits,
        "duplicates": sum(duplicates.values()), "duplicates_by_source": duplicates,
        "near_duplicates": sum(near.values()), "near_duplicates_by_source": near,
    }


def _run_task(cfg: PrepConfig, setup: _Setup, out: Path) -> None:
    """Prepare this task's share of the corpus: part shards, rejects, then the completion marker."""
    segments = plan_segments(setup.sources, cfg.task_id, cfg.num_tasks, cfg.text_mode)
    spec = _encode_spec(cfg, setup)
    packing = _SplitPacking(cfg, setup, out)
    rejects = RejectLog(merge_mod.task_rejects_path(out, cfg.task_id))
    hub = any(seg.source.kind == "hub" for seg in segments)
    total_bytes = None if hub else sum(seg.nbytes for seg in segments)
    progress = _Progress(total_bytes, cfg.show_progress,
                         f"prep task {cfg.task_id}/{cfg.num_tasks}" if cfg.num_tasks > 1 else "prep")
    workers = _task_workers(cfg, segments, hub)
    blocks, duplicates, near = _deduplicated_blocks(cfg, setup, out, segments, workers)
    shards, elapsed_s = _encode_and_pack(out, blocks, spec, workers, packing, rejects, progress, total_bytes)
    marker = _task_marker(cfg, setup, packing.parts(shards), progress, elapsed_s, workers, rejects, duplicates, near)
    write_json_atomic(merge_mod.marker_path(out, cfg.task_id), marker)
    log.info("prep task %d/%d: %d documents, %d tokens, %d rejects in %.1f s (%.0f tokens/s, %.1f MB/s)",
             cfg.task_id, cfg.num_tasks, progress.docs, progress.tokens, rejects.total, elapsed_s,
             progress.tokens / max(elapsed_s, 1e-9), progress.bytes / max(elapsed_s, 1e-9) / 1e6)
