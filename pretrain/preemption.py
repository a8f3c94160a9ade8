"""Preemption and wall-clock budget: stop at a step boundary, save on every rank, exit with a distinct code.

Any rank may receive the signal (Slurm's ``--signal=USR1@grace`` reaches every task); the flag is
all-reduced at the next step boundary so every rank stops at the same step and saves together. The
process then exits with :data:`lmforge_common.EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: "try again"), which launchers
treat as "checkpoint saved, requeue me". Under Slurm, with ``preemption.requeue``, rank 0 also runs
``scontrol requeue $SLURM_JOB_ID`` (the Lightning ``SLURMEnvironment`` auto-requeue pattern).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge_common import EXIT_PREEMPTED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopDecision:
    """What every rank agreed on after one step (:meth:`StopPolicy.poll`)."""

    reason: Literal["", "signal", "time budget"] = ""
    """"" to go on, else ``"signal"`` or ``"time budget"``: save and exit ``EXIT_PREEMPTED``."""
    save_due: bool = False
    """The checkpointer's time cadence (``checkpoint.save_every_minutes``) is due on some rank."""


AUTO_POLL_EVERY_STEPS_GPU = 10
"""Steps between stop agreements on GPU ranks when ``preemption.poll_every_steps`` is 0 (the default)."""


def poll_every_steps(configured: int, device_type: str) -> int:
    """``preemption.poll_every_steps``, with 0 resolved: every step on CPU, :data:`AUTO_POLL_EVERY_STEPS_GPU` on
    an accelerator (``device_type``: the engine's ``torch.device`` type, e.g. cpu or cuda)."""
    if configured:
        return configured
    return 1 if device_type == "cpu" else AUTO_POLL_EVERY_STEPS_GPU


class StopPolicy:
    """Signal flag and wall-clock budget, agreed on by all ranks at each step boundary.

    The clock starts when the policy is made (the budget covers set-up after that, evaluation and saves).
    """

    def __init__(self, signal_names: list[str], max_minutes: float = 0.0, requeue: bool = False,
                 poll_every_steps: int = 1, max_steps: int = 0):
        """``poll_every_steps``: steps between agreements (and at ``max_steps``, the last step)."""
        self.signalled = False
        self.signal_name = ""
        self.max_minutes, self.requeue = max_minutes, requeue
        self.poll_every_steps, self.max_steps = poll_every_steps, max_steps
        self.start_s = time.monotonic()
        self._previous = {}
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True
        self.signal_name = signal.Signals(signum).name

    def poll(self, step: int, save_timer_due: bool = False) -> StopDecision:
        """After optimizer step ``step``: whether any rank was signalled, ran out of its budget, or has
        ``save_timer_due`` (this rank's clock says a time-based save is due). Collective (one all-reduce) on
        multiples of ``poll_every_steps`` and at ``max_steps``; elsewhere "go on" without communication,
        so every rank stops at the same step."""
        from pretrain.distributed import all_reduce_sum

        if step % self.poll_every_steps and step != self.max_steps:
            return StopDecision()
        over_budget = self.max_minutes > 0 and (time.monotonic() - self.start_s) / 60 >= self.max_minutes
        signalled, over, due = all_reduce_sum([float(self.signalled), float(over_budget), float(save_timer_due)])
        return StopDecision("signal" if signalled else "time budget" if over else "", due > 0)

    def stopped(self, step: int, reason: str, checkpoint: Path | None, is_main: bool) -> dict:
        """After the stop's save: log it, requeue the Slurm job (rank 0, with ``requeue``) and return the
        summary of a preempted run (``{"preempted": True, ...}``; the CLI exits ``EXIT_PREEMPTED``)."""
        from pretrain.distributed import log_rank0

        log_rank0("stopping at step %d on %s: checkpoint %s saved, exit code %d; rerun the same command to resume",
                  step, reason, checkpoint.name if checkpoint else "(none)", EXIT_PREEMPTED)
        if self.requeue and is_main:
            requeue_slurm_job()
        return {"preempted": True, "reason": reason, "steps": step}

    def restore(self) -> None:
        """Reinstate the signal handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def requeue_slurm_job() -> bool:
    """Ask Slurm to requeue this job (``scontrol requeue $SLURM_JOB_ID``); False when not under Slurm.

    Raises:
        subprocess.CalledProcessError: scontrol refused (e.g. the job was not submitted with --requeue).
    """
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)
    log.info("requeued Slurm job %s", job_id)
    return True
