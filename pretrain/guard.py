"""NaN / inf guard and loss-spike detection.

A non-finite loss makes non-finite gradients, and a non-finite global gradient norm makes DeepSpeed
skip the optimizer step on every rank (ZeRO 1-3 and the bf16 / fp16 optimizers check the all-reduced
norm; ``engine.was_step_applied()`` reports it). Plain fp32 without ZeRO has no such check, so
:class:`GuardedAdamW` adds it. :class:`DivergenceGuard` counts skipped steps and stops the run after
``max_consecutive`` in a row, before a bad step can be checkpointed, or, with ``guard.rollback``, asks
the trainer to roll back to an earlier checkpoint and skip data past a loss spike (see
:class:`DivergenceGuard`; :func:`pretrain.checkpointer.rollback` does it).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from data_prep.errors import UserError
from pretrain.distributed import log_rank0


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps; the last complete checkpoint is left intact."""


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its step on every rank when any gradient on any rank is not finite.

    Sets ``self.overflow`` as DeepSpeed's own optimizers do, so the engine counts the skipped step
    and does not advance the learning-rate schedule.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        from pretrain.distributed import all_reduce_sum

        bad = any(not torch.isfinite(p.grad).all() for g in self.param_groups for p in g["params"] if p.grad is not None)
        self.overflow = all_reduce_sum([float(bad)])[0] > 0
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


@dataclass(frozen=True)
class RollbackRequest:
    """What :meth:`DivergenceGuard.update` asks the trainer to do: restore a checkpoint saved before ``first_bad_step``."""

    step: int
    """Optimizer step at which the trigger fired."""
    first_bad_step: int
    """First step of the spike or non-finite streak: the checkpoint restored must be older."""
    reason: str
    """One phrase for the log line, e.g. ``loss spike for 3 steps``."""


class DivergenceGuard:
    """Counts skipped (non-finite) steps, flags loss spikes over a rolling window and decides rollbacks.

    A spike is a loss above ``spike_factor`` x the mean of the last ``spike_window`` healthy losses (spike
    losses stay out of the window). With ``rollback`` on, ``spike_patience`` spike steps in a row, or
    ``max_consecutive`` non-finite ones, ask for a rollback (:class:`RollbackRequest`) while fewer than
    ``max_rollbacks`` were done (``rollbacks_done``, from the checkpoint); one more trigger stops the run.
    The trainer passes the loss averaged over all ranks when ``rollback`` is on, so every rank decides alike.
    """

    def __init__(self, max_consecutive: int, spike_factor: float, spike_window: int, rollback: bool = False,
                 spike_patience: int = 3, max_rollbacks: int = 0, rollbacks_done: int = 0):
        self.max_consecutive, self.spike_factor = max_consecutive, spike_factor
        self.rollback, self.spike_patience = rollback, spike_patience
        self.max_rollbacks, self.rollbacks_done = max_rollbacks, rollbacks_done
        self.consecutive = 0
        """Non-finite steps in a row."""
        self.spike_streak = 0
        """Spike steps in a row."""
        self.spikes = 0
        self._window: deque[float] = deque(maxlen=spike_window)

    def is_spike(self, loss: float) -> bool:
        """``loss`` is above ``spike_factor`` x the rolling mean of a full window."""
        return (self.spike_factor > 0 and len(self._window) == self._window.maxlen
                and loss > self.spike_factor * (sum(self._window) / len(self._window)))

    def update(self, step: int, step_applied: bool, loss: float) -> RollbackRequest | None:
        """Record one optimizer step; returns a rollback to do, or None.

        Raises:
            TrainingDiverged: a trigger (``max_consecutive`` non-finite steps in a row; with ``rollback``,
                ``spike_patience`` spike steps in a row) with no rollback left.
        """
        if not step_applied or not math.isfinite(loss):
            self.consecutive, self.spike_streak = self.consecutive + 1, 0
            if self.consecutive >= self.max_consecutive:
                return self._trigger(step, self.consecutive, f"{self.consecutive} consecutive non-finite steps",
                                     f"limit guard.max_consecutive_nonfinite={self.max_consecutive}")
            return None
        self.consecutive = 0
        if self.is_spike(loss):
            self.spikes += 1
            self.spike_streak += 1
            log_rank0("step %d: loss spike %.4f (> %.1fx the mean of the last %d steps)", step, loss, self.spike_factor,
                      self._window.maxlen)
            if self.rollback and self.spike_streak >= self.spike_patience:
                return self._trigger(step, self.spike_streak, f"loss spike for {self.spike_streak} steps",
                                     f"limit guard.spike_patience={self.spike_patience}")
            return None
        self.spike_streak = 0
        self._window.append(loss)
        return None

    def _trigger(self, step: int, streak: int, what: str, limit: str) -> RollbackRequest:
        if not self.rollback or self.rollbacks_done >= self.max_rollbacks:
            used = f"; {self.rollbacks_done} of guard.max_rollbacks={self.max_rollbacks} rollbacks used" if self.rollback else ""
            raise TrainingDiverged(f"step {step}: {what} ({limit}{used}); stopping")
        self.consecutive = self.spike_streak = 0
        self.rollbacks_done += 1
        return RollbackRequest(step=step, first_bad_step=step - streak + 1, reason=what)
