"""What launchers and the per-rank entry point (``lmforge train``) agree on; imported by both sides.

- ``EXIT_PREEMPTED``: a rank exits with this code after it caught the preemption signal and every
  rank saved a checkpoint together. The Slurm batch script answers it with ``scontrol requeue``;
  the requeued job runs the same command and resumes from that checkpoint. 75 is ``EX_TEMPFAIL``
  of BSD ``sysexits.h`` ("temporary failure, the user is invited to retry").
- ``PREEMPT_SIGNAL``: the signal Slurm sends ``grace`` seconds before the time limit
  (``#SBATCH --signal=USR1@grace``) and ``scancel --signal=USR1`` sends on preemption.
- The rendezvous port of a Slurm job: ``RENDEZVOUS_PORT_BASE + job_id % RENDEZVOUS_PORT_SPAN``;
  the same for every rank without any communication, different for jobs sharing a head node
  (unless their ids are ``RENDEZVOUS_PORT_SPAN`` apart), below the Linux ephemeral range
  (32768-60999) so the kernel does not hand it out as a client port.
"""
from __future__ import annotations

EXIT_PREEMPTED = 75
"""Exit code of a rank that saved a checkpoint on preemption and asks to be requeued (EX_TEMPFAIL)."""

PREEMPT_SIGNAL = "USR1"
"""Signal name (as ``sbatch --signal`` and ``scancel --signal`` spell it) that asks ranks to save and exit."""

RENDEZVOUS_PORT_BASE = 12000
"""Lowest rendezvous port (TCP) of a Slurm job."""

RENDEZVOUS_PORT_SPAN = 20000
"""Number of distinct rendezvous ports; ports are ``RENDEZVOUS_PORT_BASE`` .. ``+ SPAN - 1`` (12000-31999)."""


def rendezvous_port(job_id: int) -> int:
    """``MASTER_PORT`` (TCP port) of Slurm job ``job_id``; the sbatch script computes the same in bash."""
    return RENDEZVOUS_PORT_BASE + int(job_id) % RENDEZVOUS_PORT_SPAN
