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
from data_prep.tokenizer.folder import TOKENIZER_FILE, fingerprint
from pretrain import checkpoint, integrity
from pretrain.checkpoint import TrainState
from pretrain.config import TrainConfig, to_yaml
from pretrain.data import ORDER_NAME
from pretrain.distributed import log_rank0
from pretrain.errors import ConsistencyError
from pretrain.flops import device_description
from pretrain.integrity import CheckpointIntegrityError
from pretrain.layout import CHECKPOINT_DIR
from pretrain.preemption import StopDecision
from pretrain.run import Run

log = logging.getLogger(__name__)

PROBE_TOKENS = 64
"""Tokens per row of the probe batch whose logits a checkpoint stores for export verification."""


RUN_TOKENIZER_DIR = "tokenizer"
"""The run's own copy of its tokenizer, under ``run_dir``: checkpoints refer to it, so a run folder stands on its own."""


def run_tokenizer_dir(cfg: TrainConfig) -> str:
    """The tokenizer a run uses: its own copy (``run_dir/tokenizer``) once made, else ``data.tokenizer``."""
    copy = Path(cfg.run_dir) / RUN_TOKENIZER_DIR
    return str(copy.resolve()) if (copy / TOKENIZER_FILE).is_file() else cfg.data.tokenizer


def own_run_files(cfg: TrainConfig, is_main: bool) -> TrainConfig:
    """Collective when a process group exists: ``cfg`` with its data paths absolute and ``data.tokenizer``
    the run's own copy, so that resume and export work from any directory, after the run folder moves
    and after the original tokenizer folder is deleted.

    Rank 0 copies ``data.tokenizer`` to ``run_dir/tokenizer`` on the first start (temp + rename, the
    fingerprint checked against the original); later starts keep the copy, and when the configured
    tokenizer still exists it must have the copy's fingerprint.

    Raises:
        ConsistencyError: the configured tokenizer differs from the run's copy, or the copy from the original.
    """
    import dataclasses
    import shutil

    import torch.distributed as dist

    copy = (Path(cfg.run_dir) / RUN_TOKENIZER_DIR).resolve()
    original = Path(cfg.data.tokenizer).resolve()
    if is_main and original != copy:
        if (copy / TOKENIZER_FILE).is_file():
            if (original / TOKENIZER_FILE).is_file() and fingerprint(original) != fingerprint(copy):
                raise ConsistencyError(f"{original / TOKENIZER_FILE}: data.tokenizer differs from the run's copy {copy} "
                                       "(fingerprints differ); this run was started with another tokenizer")
        else:
            copy.parent.mkdir(parents=True, exist_ok=True)
            tmp = copy.with_name(checkpoint.TMP_PREFIX + copy.name)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(original, tmp)
            if fingerprint(tmp) != fingerprint(original):
                raise ConsistencyError(f"{tmp / TOKENIZER_FILE}: the copy of {original} has another fingerprint")
            os.replace(tmp, copy)
            log_rank0("tokenizer %s copied to %s (the run's own copy)", original, copy)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    data = dataclasses.replace(
        cfg.data, tokenizer=str(copy), path=os.path.abspath(cfg.data.path) if cfg.data.path else "",
        blend=[dataclasses.replace(b, path=os.path.abspath(b.path)) for b in cfg.data.blend])
    return dataclasses.replace(cfg, data=data)


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from per ``checkpoint.resume``, or None for a fresh start; collective when a
    process group exists (ranks verify disjoint shares of the checkpoint's files, see :func:`verify_checkpoint`).

    With ``auto``, a checkpoint that fails ``checkpoint.verify`` is logged in one line naming its bad file
    and the newest one that verifies is taken instead.

    Raises:
        UserError: ``never`` with checkpoints present, or a named checkpoint that is not complete.
        CheckpointIntegrityError: no complete checkpoint verifies, or the named one does not.
    """
    mode, verify_mode = cfg.checkpoint.resume, cfg.checkpoint.verify
    checkpoint_dir = Path(cfg.run_dir) / CHECKPOINT_DIR
    found = [p for _, p in reversed(checkpoint.complete_checkpoints(checkpoint_dir))]  # newest first
    if mode == "auto":
        bad = []
        for path in found:
            verdict = verify_checkpoint(path, verify_mode)
            if verdict.usable:
                _log_verdict(verdict, verify_mode)
                return path
            bad.append(verdict.line())
            log_rank0("checkpoint %s fails verification (%s), falling back to an older one", path, "; ".join(verdict.problems))
        if bad:
            raise CheckpointIntegrityError(f"{checkpoint_dir}: no checkpoint verifies ({' | '.join(bad)}); "
                                           "restore the files or set checkpoint.resume=never with a new run_dir")
        return None
    if mode == "never":
        if found:
            raise UserError(f"{checkpoint_dir}: holds checkpoint {found[0].name} and checkpoint.resume=never; "
                            "use a new run_dir or resume")
        return None
    path = Path(mode) if os.sep in mode else checkpoint_dir / mode
    if not (path / checkpoint.STATE_FILE).is_file():
        raise UserError(f"{path}: not a complete checkpoint (no {checkpoint.STATE_FILE})")
    verdict = verify_checkpoint(path, verify_mode)
    if not verdict.usable:
        raise CheckpointIntegrityError(f"checkpoint.resume={mode}: {verdict.line()}")
    _log_verdict(verdict, verify_mode)
    return path


def verify_checkpoint(path: Path, mode: integrity.VerifyMode) -> integrity.Verdict:
    """Check checkpoint ``path`` against its recorded digests (:func:`pretrain.integrity.verify`).

    Collective when a process group exists: each rank checks its share of the files (split by recorded
    bytes, :func:`pretrain.integrity.record_share`) and the problems are all-gathered, so every rank
    returns the same verdict.
    """
    import torch.distributed as dist

    try:  # every rank reads the same state file, so every rank takes the same branch
        record = checkpoint.read_state(path).get(integrity.DIGESTS_KEY)
    except integrity.StateFileError:
        return checkpoint.verify_saved(path, mode)  # bad, naming the state file
    if not (dist.is_available() and dist.is_initialized()) or mode == "off" or not record:
        return integrity.verify(path, record, mode)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = integrity.verify(path, integrity.record_share(record, rank, world_size), mode)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (mine.problems, mine.bytes_checked, mine.seconds))
    problems = sorted(p for g in gathered for p in g[0])
    return integrity.Verdict(path, "bad" if problems else "ok", problems, sum(g[1] for g in gathered),
                             max(g[2] for g in gathered))


def _log_verdict(verdict: integrity.Verdict, mode: str) -> None:
    if verdict.status == "unrecorded":
        log_rank0("checkpoint %s has no recorded digests (saved before lmforge recorded them): resuming unverified",
                  verdict.path.name)
    elif verdict.status == "ok":
        log_rank0("checkpoint %s verified (%s%s)", verdict.path.name, mode,
                  f", {verdict.bytes_checked / 1e9:.3f} GB in {verdict.seconds:.2f} s" if verdict.bytes_checked else "")


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
    spike) that passes ``checkpoint.verify``; rank 0 then deletes the newer ones (they hold the spike) except those in ``protect`` (being
    exported), and points ``latest`` at the restored one, so a resume never starts inside the spike.

    Raises:
        UserError: no complete checkpoint older than ``before_step`` is left.
        CheckpointIntegrityError: none of them verifies.
    """
    import torch.distributed as dist

    dist.barrier()  # rank 0 prunes after a save: every rank lists the folder once it is done
    older = [(s, p) for s, p in checkpoint.complete_checkpoints(run.checkpoint_dir) if s < before_step]
    if not older:
        ck = run.cfg.checkpoint
        raise UserError(f"{run.checkpoint_dir}: no complete checkpoint before step {before_step} to roll back to "
                        f"(checkpoint.save_every_steps={ck.save_every_steps}, keep_last={ck.keep_last})")
    for candidate in reversed(older):  # the newest that verifies (a checkpoint damaged since its save is passed over)
        verdict = verify_checkpoint(candidate[1], run.cfg.checkpoint.verify)
        if verdict.usable:
            step, path = candidate
            break
        log_rank0("checkpoint %s fails verification (%s), rolling back further", candidate[1], "; ".join(verdict.problems))
    else:
        raise CheckpointIntegrityError(f"{run.checkpoint_dir}: no checkpoint before step {before_step} verifies; "
                                       "restore the files or set guard.rollback=false")
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

    def __init__(self, run: Run, saved_step: int, crash_point: str = "", write_error: tuple[str, int] = ("", 0)):
        """``saved_step``: the step of the checkpoint the run resumed from (0 for a fresh start);
        ``crash_point``: fault injection inside the next save (``pretrain.checkpoint.CRASH_POINTS``);
        ``write_error``: fault injection ``(write, step)``: that write of the save of that step (0: of every save)
        fails (``pretrain.checkpoint.WRITE_POINTS``)."""
        self.run, self.crash_point, self.write_error = run, crash_point, write_error
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
        newest = checkpoint.latest_complete(self.run.checkpoint_dir)
        assert newest is not None  # saved_step is set by a completed save
        return newest

    def save(self, state: TrainState, extras: dict) -> Path:
        """Collective atomic save of ``state`` (see :mod:`pretrain.checkpoint`), then exports and pruning on rank 0."""
        run, cfg = self.run, self.run.cfg
        path = checkpoint.save(run.engine, run.checkpoint_dir, state, run.dist.rank,
                               {"world_size": run.dist.world_size, "fingerprints": run.fingerprints,
                                "data_order": ORDER_NAME, "config_yaml": to_yaml(cfg),
                                "tokenizer_dir": RUN_TOKENIZER_DIR,
                                "hardware": f"{run.dist.world_size} x {device_description()}", **extras},
                               probe_fn=lambda: probe(run), crash_point=self.crash_point,
                               write_error=self.write_error[0] if self.write_error[1] in (0, state.step) else "")
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
