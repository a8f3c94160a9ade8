"""Atomic, resumable checkpoints: DeepSpeed engine state plus lmforge state, never half-complete.

Layout under ``run_dir/checkpoints``::

    step_00000100/                 a complete checkpoint (DeepSpeed files + the files below)
        lmforge_state.json         step, consumed samples and tokens, fingerprints, config (written last)
        rng_state_rank{r}.pt       python / numpy / torch RNG states of data-parallel rank r
        probe.safetensors          the engine's logits on a fixed probe batch (export verification)
    .tmp-step_00000200/            a save in progress, or one killed mid-way: never loaded, removed later
    latest                         tag of the newest complete checkpoint (temp + rename), for DeepSpeed tools

Save protocol (every rank): DeepSpeed writes its partitions under the temporary tag; each rank adds
its RNG state; barrier; rank 0 writes ``lmforge_state.json`` and renames the folder to its final tag
(the atomic completion mark), then rewrites ``latest``; barrier. A kill -9 at any point leaves either
the previous complete checkpoint or the new one, never a partial one that resume would pick.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge_common import write_json_atomic

STATE_FILE = "lmforge_state.json"
PROBE_FILE = "probe.safetensors"
TMP_PREFIX = ".tmp-"
TAG_RE = re.compile(r"^step_(\d{8})$")
CRASH_POINTS = ("", "after_engine_save", "before_rename", "before_latest")
"""Fault-injection points inside a save (``debug.crash_in_save``), for the kill-during-save tests."""


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


def read_state(tag_dir: str | Path) -> dict:
    """The ``lmforge_state.json`` of a complete checkpoint."""
    return json.loads((Path(tag_dir) / STATE_FILE).read_text(encoding="utf-8"))


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


def save(engine, checkpoint_dir: str | Path, state: TrainState, rank: int, lmforge_state: dict,
         probe_fn=None, crash_point: str = "") -> Path:
    """Collective: write a complete checkpoint for ``state.step`` (see the module docstring).

    Args:
        lmforge_state: extra JSON-able fields for ``lmforge_state.json`` (config, fingerprints, world size).
        probe_fn: collective callable returning ``{name: tensor}`` on rank 0 (``None`` elsewhere) to
            store as ``probe.safetensors``.
        crash_point: fault injection, one of :data:`CRASH_POINTS`.

    Returns the final checkpoint folder.
    """
    import torch.distributed as dist

    root = Path(checkpoint_dir)
    tag = tag_for(state.step)
    final, tmp = root / tag, root / (TMP_PREFIX + tag)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=TMP_PREFIX + tag, client_state={"train_state": vars(state)}, save_latest=False)
    _save_atomic_torch(rng_states(), tmp / f"rng_state_rank{rank}.pt")
    probe = probe_fn() if probe_fn is not None else None
    _crash_if("after_engine_save", crash_point)
    dist.barrier()
    if rank == 0:
        if probe is not None:
            from safetensors.torch import save_file

            save_file(probe["tensors"], str(tmp / PROBE_FILE), metadata=probe["metadata"])
        write_json_atomic(tmp / STATE_FILE, {**vars(state), "tag": tag, **lmforge_state})
        _crash_if("before_rename", crash_point)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _crash_if("before_latest", crash_point)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, root / "latest")
    dist.barrier()
    return final


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
