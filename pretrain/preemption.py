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

log = logging.getLogger(__name__)


class StopPolicy:
    """Signal flag, wall-clock budget and time-based save cadence, agreed on by all ranks each step."""

    def __init__(self, signal_names: list[str], max_minutes: float = 0.0, save_every_minutes: float = 0.0):
        self.signalled = False
        self.signal_name = ""
        self.max_minutes, self.save_every_minutes = max_minutes, save_every_minutes
        self.start_s = self.last_save_s = time.monotonic()
        self._previous = {}
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True
        self.signal_name = signal.Signals(signum).name

    def poll(self) -> tuple[str, bool]:
        """Collective. Returns ``(stop_reason, save_due)``: ``stop_reason`` is "" to go on, else
        ``"signal"`` or ``"time budget"``; ``save_due`` when ``save_every_minutes`` have passed on any rank."""
        from pretrain.distributed import all_reduce_sum

        now = time.monotonic()
        over_budget = self.max_minutes > 0 and (now - self.start_s) / 60 >= self.max_minutes
        save_due = self.save_every_minutes > 0 and (now - self.last_save_s) / 60 >= self.save_every_minutes
        signalled, over, due = all_reduce_sum([float(self.signalled), float(over_budget), float(save_due)])
        reason = "signal" if signalled else "time budget" if over else ""
        return reason, due > 0

    def mark_saved(self) -> None:
        self.last_save_s = time.monotonic()

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
