"""Atomic, resumable checkpoints: DeepSpeed engine state plus lmforge state, never half-complete.

Layout under ``run_dir/checkpoints``::

    step_00000100/                 a complete checkpoint (DeepSpeed files + the files below)
        lmforge_state.json         step, consumed samples and tokens, fingerprints, config (written last)
        rng_state_rank{r}.pt       python / numpy / torch RNG states of data-parallel rank r
        probe.safetensors          the engine's logits on a fixed probe batch (export verification)
    .tmp-step_00000200/            a save in progress, or one killed mid-way: never loaded, removed later
    latest                         tag of the newest complete checkpoint (temp + rename), for DeepSpeed tools

Save protocol (every rank): DeepSpeed writes its partitions under the temporary tag; each rank adds
its RNG state; barrier; each rank hashes its share of the files (:mod:`pretrain.integrity`); barrier;
rank 0 merges the digests, writes the probe (and its digest) and ``lmforge_state.json`` (with the
size and XXH3-128 of every other file under ``files``, and the XXH3-128 of its own content under
``state_xxh3_128``) and renames the folder to its final tag (the atomic completion mark), then rewrites
``latest``; barrier. A kill -9 at any point leaves either the previous complete checkpoint or the new
one, never a partial one that resume would pick. A write error at any point (disk full, quota, file
size limit) ends the save on every rank with one :class:`CheckpointWriteError` line and removes the
partial folder; the previous checkpoint is untouched.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np

from lmforge_common import UserError, write_bytes_atomic, write_json_atomic
from pretrain import integrity
from pretrain.config import CrashPoint, WritePoint

STATE_FILE = "lmforge_state.json"
PROBE_FILE = "probe.safetensors"
TMP_PREFIX = ".tmp-"
TAG_RE = re.compile(r"^step_(\d{8})$")
CRASH_POINTS: tuple[str, ...] = get_args(CrashPoint)
"""Fault-injection points inside a save (``debug.crash_in_save``), for the kill-during-save tests; "" = none."""
WRITE_POINTS: tuple[str, ...] = get_args(WritePoint)
"""The writes of a save, in order (``debug.write_error_in_save``); "" = none."""
STATE_DIGEST_KEY = "state_xxh3_128"
"""Key of the XXH3-128 of the state file's own content (every other key, canonical JSON) in ``lmforge_state.json``."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done (skipped non-finite steps included)."""
    consumed_samples: int = 0
    """Sequences consumed by all ranks together: the cursor into the global sample order."""
    tokens: int = 0
    """Tokens consumed by all ranks together."""
    skipped_steps: int = 0
    """Optimizer steps skipped because the loss or gradient norm was not finite."""
    skipped_samples: int = 0
    """Sequences of the global sample order passed over, not trained on (loss-spike rollbacks, ``guard.rollback``)."""
    rollbacks: int = 0
    """Loss-spike rollbacks done so far (``guard.max_rollbacks`` caps them)."""

    @property
    def data_position(self) -> int:
        """Cursor into the global sample order: trained plus skipped sequences."""
        return self.consumed_samples + self.skipped_samples

    def advance(self, sequences: int, tokens: int, applied: bool) -> None:
        """Count one optimizer step of ``sequences`` sequences and ``tokens`` tokens (all ranks together)."""
        self.step += 1
        self.consumed_samples += sequences
        self.tokens += tokens
        self.skipped_steps += int(not applied)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint, oldest first; partial ones are ignored."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = TAG_RE.match(path.name)
        if m and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_complete(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def state_digest(state: dict) -> str:
    """XXH3-128 of ``state`` as canonical JSON (keys sorted, after a JSON round trip, so what is read back hashes
    the same as what was written)."""
    import xxhash

    canonical = json.dumps(json.loads(json.dumps(state)), sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(canonical.encode("utf-8"))


def read_state(tag_dir: str | Path) -> dict:
    """The ``lmforge_state.json`` of a complete checkpoint, checked against its own recorded digest
    (a state file written before the digest existed is taken as it is).

    Raises:
        integrity.StateFileError: the file is not valid UTF-8 JSON (truncated, a flipped byte) or its
            content does not match its recorded digest.
    """
    path = Path(tag_dir) / STATE_FILE
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise integrity.StateFileError(f"{path}: unreadable ({exc})") from None
    want = state.pop(STATE_DIGEST_KEY, None)
    if want is not None and (got := state_digest(state)) != want:
        raise integrity.StateFileError(f"{path}: content {integrity.HASH_NAME} {got}, recorded {want}")
    return state


def verify_saved(tag_dir: str | Path, mode: integrity.VerifyMode = "checksum",
                 record: dict | None = None) -> integrity.Verdict:
    """:func:`pretrain.integrity.verify` of checkpoint ``tag_dir`` against the record in its state file
    (or ``record``, a share of it); a state file that cannot be read makes the checkpoint bad, naming it."""
    if record is None:
        try:
            record = read_state(tag_dir).get(integrity.DIGESTS_KEY)
        except integrity.StateFileError as exc:
            return integrity.Verdict(Path(tag_dir), "bad", [f"{STATE_FILE}: {str(exc).split(': ', 1)[1]}"])
    return integrity.verify(tag_dir, record, mode)


def rng_states() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states: dict) -> None:
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def _crash_if(point: str, crash_point: str) -> None:
    if crash_point and point == crash_point:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, as a node failure would be


def _save_atomic_torch(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _write_error_if(point: str, fault_point: str):
    """Fault injection (``debug.write_error_in_save``): the writes of ``point`` run under a file size limit of
    0 bytes (RLIMIT_FSIZE, SIGXFSZ ignored), so they fail with a real EFBIG, as on a full disk or quota."""
    if not fault_point or point != fault_point:
        yield
        return
    import resource

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def save(engine, checkpoint_dir: str | Path, state: TrainState, rank: int, lmforge_state: dict,
         probe_fn=None, crash_point: str = "", write_error: str = "") -> Path:
    """Collective: write a complete checkpoint for ``state.step`` (see the module docstring).

    Args:
        lmforge_state: extra JSON-able fields for ``lmforge_state.json`` (config, fingerprints, world size).
        probe_fn: collective callable returning ``{name: tensor}`` on rank 0 (``None`` elsewhere) to
            store as ``probe.safetensors``.
        crash_point: fault injection, one of :data:`CRASH_POINTS`.
        write_error: fault injection, one of :data:`WRITE_POINTS`: that write fails (a real EFBIG).

    Returns the final checkpoint folder.

    Raises:
        CheckpointWriteError: on every rank, when a write of any rank failed for lack of space (one line
            naming the folder and the bytes needed); the partial folder is removed.
    """
    import torch.distributed as dist

    root = Path(checkpoint_dir)
    tag = tag_for(state.step)
    final, tmp = root / tag, root / (TMP_PREFIX + tag)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    failure = None
    try:
        with _write_error_if("engine", write_error):
            engine.save_checkpoint(str(root), tag=TMP_PREFIX + tag, client_state={"train_state": vars(state)},
                                   save_latest=False)
            _save_atomic_torch(rng_states(), tmp / f"rng_state_rank{rank}.pt")
    except (OSError, RuntimeError) as exc:
        failure = _storage_failure(exc, tmp, rank, engine)
    _agree_on_write(failure, tmp, rank)
    probe = probe_fn() if probe_fn is not None else None
    _crash_if("after_engine_save", crash_point)
    dist.barrier()  # every rank's files exist: hash them while their pages are still cached
    try:
        with _write_error_if("digests", write_error):
            integrity.write_rank_digests(tmp, rank, dist.get_world_size(), exclude=(STATE_FILE, PROBE_FILE))
    except OSError as exc:
        failure = _storage_failure(exc, tmp, rank, engine)
    _agree_on_write(failure, tmp, rank)
    if rank == 0:
        try:
            _write_state_record(root, tag, state, lmforge_state, probe, dist.get_world_size(), write_error)
        except OSError as exc:
            failure = _storage_failure(exc, tmp, rank, engine)
    _agree_on_write(failure, tmp, rank)
    if rank == 0:
        _publish(root, tag, crash_point)
    dist.barrier()
    return final


def _write_state_record(root: Path, tag: str, state: TrainState, lmforge_state: dict, probe: dict | None,
                        world_size: int, write_error: str) -> None:
    """Rank 0, in ``root/TMP_PREFIX+tag``: merge the ranks' digests, write the probe and the state file (the
    record of every file's sha256), and reserve ``latest.tmp``. Raises OSError on a failed write."""
    tmp = root / (TMP_PREFIX + tag)
    record = integrity.merge_rank_digests(tmp, world_size)
    if probe is not None:
        from safetensors.torch import save as safetensors_bytes

        with _write_error_if("probe", write_error):  # bytes written by Python: a failed write is an OSError
            write_bytes_atomic(tmp / PROBE_FILE, safetensors_bytes(probe["tensors"], metadata=probe["metadata"]))
        record.update(integrity.digest(tmp, [PROBE_FILE]))
    content = {**vars(state), "tag": tag, **lmforge_state, integrity.DIGESTS_KEY: dict(sorted(record.items()))}
    with _write_error_if("state", write_error):
        write_json_atomic(tmp / STATE_FILE, {**content, STATE_DIGEST_KEY: state_digest(content)})
        write_bytes_atomic(root / "latest.tmp", tag.encode())  # space taken now: the rename below cannot fail for it


def _publish(root: Path, tag: str, crash_point: str) -> None:
    """Rank 0: rename the complete temporary folder to ``root/tag``, then point ``latest`` at it."""
    final = root / tag
    _crash_if("before_rename", crash_point)
    if final.exists():
        shutil.rmtree(final)
    os.replace(root / (TMP_PREFIX + tag), final)
    _crash_if("before_latest", crash_point)
    os.replace(root / "latest.tmp", root / "latest")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, quota, file size limit); the previous one is intact."""

    agreed_by_all_ranks = True


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""Write errors of a full or limited file system: no space, quota exceeded, file size limit (RLIMIT_FSIZE)."""
TORCH_WRITE_FAILURE = "inline_container.cc"
"""torch.save's zip writer reports a failed write() as a RuntimeError from this source file (no errno)."""


def _storage_failure(exc: Exception, tmp: Path, rank: int, engine) -> str:
    """One line naming the folder, the bytes a checkpoint needs and the bytes free, or re-raise ``exc``
    when it is not a write failure of the file system."""
    if isinstance(exc, OSError) and exc.errno not in STORAGE_ERRNOS:
        raise exc
    if isinstance(exc, RuntimeError) and TORCH_WRITE_FAILURE not in str(exc):
        raise exc
    free = shutil.disk_usage(tmp.parent).free if tmp.parent.is_dir() else 0
    return (f"{tmp}: rank {rank} could not write the checkpoint ({_write_error_text(exc, tmp)}): "
            f"it needs about {needed_bytes(tmp.parent, engine)} bytes, {free} bytes free on that file system (or a quota / "
            "file size limit); the previous checkpoint is intact")


def _write_error_text(exc: Exception, tmp: Path) -> str:
    """``strerror``, with the file when the error names one (relative to the checkpoint folder)."""
    if not isinstance(exc, OSError):
        return "torch.save write failed"
    name = exc.filename if isinstance(exc.filename, str) else ""
    if name:
        name = os.path.relpath(name, tmp) if os.path.abspath(name).startswith(str(tmp.absolute())) else name
    return f"{exc.strerror}{f' writing {name}' if name else ''}"


def needed_bytes(checkpoint_dir: Path, engine) -> int:
    """Bytes a checkpoint takes: the newest complete one's recorded file sizes, else 16 bytes per parameter
    (fp32 weights, fp32 master copy, Adam's two moments; Rajbhandari et al. 2020, ZeRO, section 3.1)."""
    newest = latest_complete(checkpoint_dir)
    try:
        record = read_state(newest).get(integrity.DIGESTS_KEY) if newest is not None else None
    except integrity.StateFileError:
        record = None
    if record:
        return sum(f["bytes"] for f in record.values())
    return 16 * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())  # ZeRO-3: full size


def _agree_on_write(failure: str | None, tmp: Path, rank: int) -> None:
    """Collective: every rank raises :class:`CheckpointWriteError` (the first failure's line) when one failed to write."""
    import torch.distributed as dist

    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    first = next((f for f in failures if f), None)
    if first:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint stays complete
        dist.barrier()  # all ranks raise together, after rank 0 gave the space back (the SIGABRT once blamed on
        # a rank leaving early came from the interpreter's finalization: lmforge.cli.entry)
        raise CheckpointWriteError(first)


def prune(checkpoint_dir: str | Path, keep_last: int, keep_every_steps: int = 0, protect=()) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (0 keeps all), except steps that
    are multiples of ``keep_every_steps`` and the folders in ``protect`` (e.g. being exported), and
    leftover temporary folders. Rank 0 only. Returns what was removed."""
    removed = []
    found = complete_checkpoints(checkpoint_dir)
    if keep_last > 0:
        for step, path in found[:-keep_last]:
            if (keep_every_steps and step % keep_every_steps == 0) or path in set(map(Path, protect)):
                continue
            shutil.rmtree(path)
            removed.append(path)
    root = Path(checkpoint_dir)
    for path in root.glob(TMP_PREFIX + "*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def universal_dir(tag_dir: Path) -> Path:
    """Where the universal (world-size independent) form of ``tag_dir`` is kept."""
    return tag_dir.parent / "universal" / tag_dir.name


def convert_to_universal(tag_dir: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (``ds_to_universal``), once; rank 0 only.

    ZeRO partitions the optimizer state by data-parallel rank, so a checkpoint saved at world size
    N can only be loaded at another world size through this re-splittable form. Written to a
    temporary folder and renamed.
    """
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    out = universal_dir(tag_dir)
    if (out / "zero").is_dir():
        return out
    tmp = out.with_name(TMP_PREFIX + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    ds_to_universal.main(Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    os.replace(tmp, out)
    return out


def load(engine, tag_dir: Path, rank: int, universal: bool = False) -> TrainState:
    """Collective: restore engine (model, optimizer partitions, scheduler) and this rank's RNG from ``tag_dir``.

    ``universal``: the checkpoint was saved at another world size; rank 0 converts it with
    :func:`convert_to_universal` and the engine (built with ``checkpoint.load_universal``) loads that.
    When the checkpoint holds no RNG state for ``rank``, the RNG keeps its seeded state (training
    has no dropout by default, so the loss does not depend on it).
    """
    import torch
    import torch.distributed as dist

    source = tag_dir
    if universal:
        if rank == 0:
            convert_to_universal(tag_dir)
        dist.barrier()
        source = universal_dir(tag_dir)
    load_path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load the checkpoint")
    rng_file = tag_dir / f"rng_state_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_states(torch.load(rng_file, weights_only=False))
    saved = read_state(tag_dir)
    defaults = vars(TrainState())  # a checkpoint from before a field existed gets its default
    return TrainState(**{k: saved.get(k, v) for k, v in defaults.items()})
