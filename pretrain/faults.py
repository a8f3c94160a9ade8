"""Fault injection for the fault-tolerance tests (``debug.*``), kept out of the training step.

A NaN loss on rank 0 at chosen steps (a forward hook on the model multiplies the training loss by
NaN, so its gradients are NaN and DeepSpeed skips the step on every rank), a real ``kill -9`` of
every rank right after a chosen step, and the point inside a save at which to kill
(``pretrain.checkpoint.CRASH_POINTS``). Inert, and no hook installed, when all are off.
"""
from __future__ import annotations

import os
import signal

from pretrain.config import DebugConfig
from pretrain.run import Engine


class FaultInjector:
    """Arms the NaN hook around the chosen steps and kills after ``kill_at_step``."""

    def __init__(self, debug: DebugConfig, is_main: bool, engine: Engine):
        self.nan_steps = set(debug.inject_nan_at_steps) if is_main else set()
        self.kill_at_step = debug.kill_at_step
        self.crash_in_save = debug.crash_in_save
        """Passed to ``pretrain.checkpoint.save`` by the checkpointer."""
        self._armed = False
        if self.nan_steps:
            engine.module.register_forward_hook(self._nan_loss)

    def _nan_loss(self, module, args, output):
        if self._armed and module.training:
            output["loss"] = output["loss"] * float("nan")  # ModelOutput keeps the key and the attribute in step
        return output

    def before_step(self, step: int) -> None:
        """Arm the NaN hook for optimizer step ``step`` (1-based) when it is one of ``inject_nan_at_steps``."""
        self._armed = step in self.nan_steps

    def after_step(self, step: int) -> None:
        """Disarm; SIGKILL this process when ``step`` is ``kill_at_step`` (as a node failure would)."""
        self._armed = False
        if step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
