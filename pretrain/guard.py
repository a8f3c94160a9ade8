"""NaN / inf guard and loss-spike detection.

A non-finite loss makes non-finite gradients, and a non-finite global gradient norm makes DeepSpeed
skip the optimizer step on every rank (ZeRO 1-3 and the bf16 / fp16 optimizers check the all-reduced
norm; ``engine.was_step_applied()`` reports it). Plain fp32 without ZeRO has no such check, so
:class:`GuardedAdamW` adds it. :class:`DivergenceGuard` counts skipped steps and stops the run after
``max_consecutive`` in a row, before a bad step can be checkpointed.
"""
from __future__ import annotations

import math
from collections import deque

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


class DivergenceGuard:
    """Counts skipped (non-finite) steps and flags loss spikes over a rolling window."""

    def __init__(self, max_consecutive: int, spike_factor: float, spike_window: int):
        self.max_consecutive, self.spike_factor = max_consecutive, spike_factor
        self.consecutive = 0
        self.spikes = 0
        self._window: deque[float] = deque(maxlen=spike_window)

    def update(self, step: int, step_applied: bool, loss: float) -> bool:
        """Record one optimizer step; returns True when ``loss`` is a spike.

        Raises:
            TrainingDiverged: ``max_consecutive`` non-finite steps in a row.
        """
        if not step_applied or not math.isfinite(loss):
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                raise TrainingDiverged(f"step {step}: {self.consecutive} consecutive non-finite steps "
                                       f"(limit guard.max_consecutive_nonfinite={self.max_consecutive}); stopping")
            return False
        self.consecutive = 0
        spike = (self.spike_factor > 0 and len(self._window) == self._window.maxlen
                 and loss > self.spike_factor * (sum(self._window) / len(self._window)))
        self.spikes += int(spike)
        self._window.append(loss)
        return spike

    def after_step(self, step: int, step_applied: bool, loss: float) -> None:
        """:meth:`update`, logging a spike on rank 0.

        Raises:
            TrainingDiverged: see :meth:`update`.
        """
        if self.update(step, step_applied, loss):
            log_rank0("step %d: loss spike %.4f (> %.1fx the mean of the last %d steps)", step, loss, self.spike_factor,
                      self._window.maxlen)
