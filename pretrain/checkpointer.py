"""When to save, what goes with a save, pruning and background exports; where to resume from.

The on-disk format and the atomic save protocol are :mod:`pretrain.checkpoint`'s; this module is the
policy around them (as torchtitan's ``CheckpointManager``): a save every ``checkpoint.save_every_steps``
steps and every ``checkpoint.save_every_minutes``, one when a stop is agreed (signal or time budget),
and one at the end unless the last step was just saved.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from data_prep.errors import UserError
from pretrain import checkpoint
from pretrain.checkpoint import TrainState
from pretrain.config import TrainConfig, to_yaml
from pretrain.data import ORDER_NAME
from pretrain.distributed import log_rank0
from pretrain.errors import ConsistencyError
from pretrain.flops import device_description
from pretrain.layout import CHECKPOINT_DIR
from pretrain.preemption import StopDecision
from pretrain.run import Run

log = logging.getLogger(__name__)

PROBE_TOKENS = 64
"""Tokens per row of the probe batch whose logits a checkpoint stores for export verification."""


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from per ``checkpoint.resume``, or None for a fresh start.

    Raises:
        UserError: ``never`` with checkpoints present, or a named checkpoint that is not complete.
    """
    mode = cfg.checkpoint.resume
    checkpoint_dir = Path(cfg.run_dir) / CHECKPOINT_DIR
    newest = checkpoint.latest_complete(checkpoint_dir)
    if mode == "auto":
        return newest
    if mode == "never":
        if newest is not None:
            raise UserError(f"{checkpoint_dir}: holds checkpoint {newest.name} and checkpoint.resume=never; "
                            "use a new run_dir or resume")
        return None
    path = Path(mode) if os.sep in mode else checkpoint_dir / mode
    if not (path / checkpoint.STATE_FILE).is_file():
        raise UserError(f"{path}: not a complete checkpoint (no {checkpoint.STATE_FILE})")
    return path


def resume(run: Run, tag_dir: Path) -> tuple[TrainState, dict]:
    """Collective: restore the engine and RNG from ``tag_dir``; returns its state and the start-of-run
    validation result saved with it (``{"val_start": dict | None}``).

    Raises:
        ConsistencyError: the checkpoint was trained with another sample order, tokenizer or data.
    """
    saved = checkpoint.read_state(tag_dir)
    if saved.get("data_order") != ORDER_NAME:
        raise ConsistencyError(f"{tag_dir}: checkpoint was trained with sample order {saved.get('data_order')!r}, "
                               f"this lmforge uses {ORDER_NAME!r}; resuming would repeat and skip samples")
    if saved["fingerprints"] != run.fingerprints:
        raise ConsistencyError(f"{tag_dir}: checkpoint was trained with tokenizer/data {saved['fingerprints']}, "
                               f"now {run.fingerprints}; refusing to resume on other data")
    state = checkpoint.load(run.engine, tag_dir, run.dist.rank, universal=run.resume_universal)
    log_rank0("resumed from %s: step %d, %d consumed samples (saved at world size %d, now %d)", tag_dir.name,
              state.step, state.consumed_samples, saved["world_size"], run.dist.world_size)
    return state, {"val_start": saved.get("val_start")}


def rollback(run: Run, before_step: int, protect=()) -> tuple[TrainState, Path]:
    """Collective: restore the newest complete checkpoint older than ``before_step`` (the first step of a loss
    spike); rank 0 then deletes the newer ones (they hold the spike) except those in ``protect`` (being
    exported), and points ``latest`` at the restored one, so a resume never starts inside the spike.

    Raises:
        UserError: no complete checkpoint older than ``before_step`` is left.
    """
    import torch.distributed as dist

    dist.barrier()  # rank 0 prunes after a save: every rank lists the folder once it is done
    older = [(s, p) for s, p in checkpoint.complete_checkpoints(run.checkpoint_dir) if s < before_step]
    if not older:
        ck = run.cfg.checkpoint
        raise UserError(f"{run.checkpoint_dir}: no complete checkpoint before step {before_step} to roll back to "
                        f"(checkpoint.save_every_steps={ck.save_every_steps}, keep_last={ck.keep_last})")
    step, path = older[-1]
    universal = checkpoint.read_state(path)["world_size"] != run.dist.world_size
    state = checkpoint.load(run.engine, path, run.dist.rank, universal=universal)
    dist.barrier()
    if run.dist.is_main:
        for newer_step, newer in checkpoint.complete_checkpoints(run.checkpoint_dir):
            if newer_step > step and newer not in set(map(Path, protect)):
                shutil.rmtree(newer)
        latest_tmp = run.checkpoint_dir / "latest.tmp"
        latest_tmp.write_text(path.name)
        os.replace(latest_tmp, run.checkpoint_dir / "latest")
    dist.barrier()
    return state, path


def probe(run: Run) -> dict | None:
    """Collective forward of a fixed probe batch; rank 0 gets ``{tensors, metadata}`` for ``probe.safetensors``."""
    import torch

    if run.val_batches:
        rows = run.val_batches[0].input_ids
    else:
        rows = next(run.source.train_batches(run.dist.rank, run.dist.world_size, run.cfg.deepspeed.micro_batch_size,
                                             run.cfg.seed, 0)).input_ids
    ids = np.ascontiguousarray(rows[:2, :PROBE_TOKENS])
    x = torch.from_numpy(ids).to(run.engine.device)
    run.engine.eval()
    with torch.no_grad():
        logits = run.engine(input_ids=x).logits.float().cpu()
    run.engine.train()
    if not run.dist.is_main:
        return None
    from pretrain.export.verify import probe_metadata

    return {"tensors": {"input_ids": x.cpu(), "logits": logits},
            "metadata": probe_metadata(run.cfg.deepspeed.precision, run.engine.device)}


class Checkpointer:
    """Owns the save cadence, pruning and (rank 0) the background Hugging Face exports."""

    def __init__(self, run: Run, saved_step: int, crash_point: str = ""):
        """``saved_step``: the step of the checkpoint the run resumed from (0 for a fresh start);
        ``crash_point``: fault injection inside the next save (``pretrain.checkpoint.CRASH_POINTS``)."""
        self.run, self.crash_point = run, crash_point
        ck = run.cfg.checkpoint
        self.save_every_steps, self.save_every_minutes = ck.save_every_steps, ck.save_every_minutes
        self.saved_step = saved_step
        self.last_save_s = time.monotonic()
        self.exports: list[tuple[Path, subprocess.Popen]] = []
        """Rank 0: ``(checkpoint, process)`` of each background export."""

    def timer_due(self) -> bool:
        """This rank's clock says ``save_every_minutes`` have passed since the last save (agreed on by
        :meth:`pretrain.preemption.StopPolicy.poll`)."""
        return self.save_every_minutes > 0 and (time.monotonic() - self.last_save_s) / 60 >= self.save_every_minutes

    def after_step(self, state: TrainState, extras: dict, stop: StopDecision) -> Path | None:
        """Collective when a save is due: on a stop, on the step and time cadences before the last step
        (the end of the run saves once, in :meth:`final`). Returns the checkpoint saved, if any."""
        step_due = self.save_every_steps and state.step % self.save_every_steps == 0
        if stop.reason or ((stop.save_due or step_due) and state.step < self.run.cfg.max_steps):
            return self.save(state, extras)
        return None

    def final(self, state: TrainState, extras: dict) -> Path:
        """Collective: the end-of-run checkpoint, saved now unless ``state.step`` already was."""
        if self.saved_step != state.step:
            return self.save(state, extras)
        return checkpoint.latest_complete(self.run.checkpoint_dir)

    def save(self, state: TrainState, extras: dict) -> Path:
        """Collective atomic save of ``state`` (see :mod:`pretrain.checkpoint`), then exports and pruning on rank 0."""
        run, cfg = self.run, self.run.cfg
        path = checkpoint.save(run.engine, run.checkpoint_dir, state, run.dist.rank,
                               {"world_size": run.dist.world_size, "fingerprints": run.fingerprints,
                                "data_order": ORDER_NAME, "config_yaml": to_yaml(cfg),
                                "hardware": f"{run.dist.world_size} x {device_description()}", **extras},
                               probe_fn=lambda: probe(run), crash_point=self.crash_point)
        if run.dist.is_main:
            every = cfg.checkpoint.export_every_steps
            if every and state.step % every == 0:
                from pretrain.export.core import spawn_export

                self.exports.append((path, spawn_export(path, Path(cfg.run_dir) / "hf" / path.name)))
                log_rank0("exporting %s to hf/%s in the background", path.name, path.name)
            running = [p for p, proc in self.exports if proc.poll() is None]
            checkpoint.prune(run.checkpoint_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every_steps,
                             protect=running)
        log_rank0("checkpoint %s saved", path.name)
        self.saved_step, self.last_save_s = state.step, time.monotonic()
        return path

    def exporting(self) -> list[Path]:
        """Rank 0: the checkpoints whose background export is still running."""
        return [p for p, proc in self.exports if proc.poll() is None]

    def wait_for_exports(self) -> None:
        """Rank 0: wait for background exports; a failed one is logged with its log file, not raised."""
        for path, proc in self.exports:
            if proc.wait() != 0:
                log.warning("background export of %s failed (exit %d): see %s", path.name, proc.returncode,
                            Path(self.run.cfg.run_dir) / "hf" / f"{path.name}.export.log")
