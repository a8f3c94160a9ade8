"""Fault injection for the fault-tolerance tests (``debug.*``), kept out of the training step.

A NaN loss on rank 0 at chosen steps (a forward hook on the model multiplies the training loss by
NaN, so its gradients are NaN and DeepSpeed skips the step on every rank), a loss spike on rank 0
(the same hook with ``debug.spike_loss_factor``: the step is applied, with scaled gradients), a real
``kill -9`` of every rank right after a chosen step, the point inside a save at which to kill
(``pretrain.checkpoint.CRASH_POINTS``), the write of a save that fails (``pretrain.checkpoint.WRITE_POINTS``), a SIGTERM
after a step or inside an evaluation, a rank that hangs, and a skip of data at start or after a step (the
reference of the rollback tests). Inert, and no hook installed, when all are off.
"""
from __future__ import annotations

import os
import signal
import time

from pretrain.checkpoint import TrainState
from pretrain.config import DebugConfig
from pretrain.distributed import DistInfo, log_rank0
from pretrain.run import Engine

HANG_SLEEP_S = 3600.0
"""One sleep of the hanging rank (``debug.hang_at_step``); it sleeps again until killed."""


class FaultInjector:
    """Arms the loss hook around the chosen steps, hangs before ``hang_at_step``, kills after ``kill_at_step``."""

    def __init__(self, debug: DebugConfig, dist: DistInfo, engine: Engine):
        self.nan_steps = set(debug.inject_nan_at_steps) if dist.is_main else set()
        self.spike_steps = set(debug.spike_at_steps) if dist.is_main else set()
        self.spike_factor = debug.spike_loss_factor
        self.kill_at_step = debug.kill_at_step
        self.sigterm_at_step = debug.sigterm_at_step if dist.is_main else 0
        self.sigterm_in_eval = debug.sigterm_in_eval
        self.hang_at_step = debug.hang_at_step if dist.rank == min(1, dist.world_size - 1) else 0
        self.start_skip_batches = debug.start_skip_batches
        self.skip_after_step = debug.skip_batches_after_step
        self.crash_in_save = debug.crash_in_save
        """Passed to ``pretrain.checkpoint.save`` by the checkpointer."""
        self.write_error_in_save, self.write_error_at_step = debug.write_error_in_save, debug.write_error_at_step
        """Passed to ``pretrain.checkpoint.save`` by the checkpointer (for the save of ``write_error_at_step``; 0 = each)."""
        self._factor: float | None = None
        self._global_batch = 0
        self._spiked: set[int] = set()
        self._sigterm_armed = False
        """An evaluation forward sends SIGTERM (``sigterm_in_eval``, after ``sigterm_at_step``)."""
        if self.nan_steps or self.spike_steps or (self.sigterm_at_step and self.sigterm_in_eval):
            engine.module.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output):
        if self._factor is not None and module.training:
            output["loss"] = output["loss"] * self._factor  # ModelOutput keeps the key and the attribute in step
        if self._sigterm_armed and not module.training:
            self._sigterm_armed = False
            os.kill(os.getpid(), signal.SIGTERM)
        return output

    def at_start(self, state: TrainState, global_batch: int) -> None:
        """Skip ``debug.start_skip_batches`` global batches of ``global_batch`` sequences, as a rollback would
        (unless ``debug.skip_batches_after_step`` defers the skip, see :meth:`skip_now`)."""
        self._global_batch = global_batch
        if self.start_skip_batches and not self.skip_after_step:
            state.skipped_samples += self.start_skip_batches * global_batch
            log_rank0("debug: skipping %d global batches at start", self.start_skip_batches)

    def skip_now(self, state: TrainState) -> bool:
        """Before the optimizer step after ``debug.skip_batches_after_step`` (once per process): skip the
        ``start_skip_batches`` global batches now; True when the data position moved (the caller restarts its batches)."""
        if not (self.start_skip_batches and self.skip_after_step and state.step == self.skip_after_step):
            return False
        self.skip_after_step = 0
        state.skipped_samples += self.start_skip_batches * self._global_batch
        log_rank0("debug: skipping %d global batches after step %d", self.start_skip_batches, state.step)
        return True

    def before_step(self, step: int) -> None:
        """Arm the loss hook for optimizer step ``step`` (1-based): NaN on ``inject_nan_at_steps``, a spike on the
        first visit of a ``spike_at_steps`` step; sleep for good when ``step`` is this rank's ``hang_at_step``."""
        self._factor = float("nan") if step in self.nan_steps else None
        if step in self.spike_steps and step not in self._spiked:
            self._spiked.add(step)
            self._factor = self.spike_factor
        while step == self.hang_at_step:
            time.sleep(HANG_SLEEP_S)

    def after_step(self, step: int) -> None:
        """Disarm; SIGKILL this process when ``step`` is ``kill_at_step`` (as a node failure would); at
        ``sigterm_at_step``, SIGTERM now or arm it for the next evaluation forward."""
        self._factor = None
        if step == self.sigterm_at_step:
            if self.sigterm_in_eval:
                self._sigterm_armed = True
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        if step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
