"""Readable sbatch scripts: multi-node training, and data prep as a job array plus a dependent merge.

Training (:func:`render_train_script`): srun starts one task per rank, one per GPU, or on CPU one
per node. One rank per GPU rather than one per-node launcher (torchrun) per node: srun is then
the only process manager, each rank gets its own ``SLURM_PROCID`` / ``SLURM_LOCALID`` (read by
``pretrain.distributed``), its own log file, and Slurm signals (preemption, time limit) reach the
ranks directly. On CPU one rank per node uses the node's cores through intra-op threads instead of
splitting them between gloo ranks.

Rendezvous: ``MASTER_ADDR`` is the first host of ``SLURM_JOB_NODELIST`` (``scontrol show
hostnames``) at the address Slurm itself uses for it (its ``NodeAddr``, which defaults to the node
name); ``MASTER_PORT`` is derived from the job id (:func:`lmforge_common.rendezvous_port`).

Preemption (when on): ``#SBATCH --signal=USR1@grace`` and ``--requeue``; the ranks catch the
signal, save together and exit ``EXIT_PREEMPTED``; the script then runs ``scontrol requeue`` and
the requeued job reruns the same command, which resumes from the run dir's newest checkpoint.

A dead rank: each task runs its command under the watcher of :mod:`launch.diagnose`, which samples
the rank's RSS and, when it dies from a signal, writes one line (signal, rank, node, last completed
step from its heartbeat, and for SIGKILL the likely out-of-memory killer with the RSS and the node's
memory) to the rank's log; ``srun --kill-on-bad-exit=1`` then ends the other ranks at once, and the
batch script copies the diagnosis lines into the batch log.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from launch.diagnose import LINE_PREFIX
from launch.errors import LaunchError
from launch.slurm import SlurmOptions, sbatch_header
from lmforge_common import EXIT_PREEMPTED, PREEMPT_SIGNAL, RENDEZVOUS_PORT_BASE, RENDEZVOUS_PORT_SPAN

SLURM_DIR = "slurm"
"""Folder (inside the run dir, or the prepared-data dir) holding the scripts and every Slurm log."""

_RANK_HEADER = ('echo "lmforge: rank $SLURM_PROCID of $SLURM_NTASKS on node $SLURMD_NODENAME ($(uname -n)), '
                'job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}"')


def _job_name(prefix: str, folder: str) -> str:
    return "-".join([prefix, *Path(folder).name.split()])


def _q(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def render_train_script(opts: SlurmOptions, command: Sequence[str], run_dir: str, workdir: str,
                        python: str | None = None) -> str:
    """The sbatch script that runs ``command`` once per rank (``opts.world_size`` ranks).

    Args:
        command: the per-rank command, e.g. ``[python, "-m", "lmforge", "train", CONFIG, *overrides]``.
        run_dir: the training run dir; the script's logs go to ``run_dir/slurm/``.
        workdir: the job's working directory (relative paths in ``command`` are relative to it).
        python: the interpreter that runs the rank watcher (``python -m launch.diagnose``); default ``command[0]``.

    Raises:
        LaunchError: invalid ``opts`` (see :meth:`SlurmOptions.validate`).
    """
    opts.validate()
    logs = f"{run_dir}/{SLURM_DIR}"
    job_name = opts.job_name or _job_name("lmforge", run_dir)
    extra = [f"--nodes={opts.nodes}", f"--ntasks-per-node={opts.ranks_per_node}"]
    if opts.gpus_per_node:
        extra.append(f"--gpus-per-node={opts.gpus_per_node}")
    header = sbatch_header(opts, job_name, opts.output or f"{logs}/%j-batch.out", workdir, tuple(extra))
    if opts.preemption:
        header += [f"#SBATCH --signal={PREEMPT_SIGNAL}@{opts.signal_grace_s}", "#SBATCH --requeue",
                   "#SBATCH --open-mode=append"]
    per_node = f"{opts.gpus_per_node} ranks (one per GPU)" if opts.gpus_per_node else "1 rank (CPU: one per node)"
    lines = ["#!/bin/bash",
             "# lmforge training job, rendered by `lmforge launch slurm`; submit with sbatch.",
             f"# {opts.nodes} node(s) x {per_node} = {opts.world_size} data-parallel ranks.",
             *header, "",
             "set -euo pipefail", "",
             "# Rendezvous: the first node of the allocation, at the address Slurm uses for it (NodeAddr,",
             "# the node name on most clusters), on a port derived from the job id.",
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             'MASTER_ADDR=$(scontrol show node "$head_node" -o | tr " " "\\n" | sed -n "s/^NodeAddr=//p")',
             'export MASTER_ADDR=${MASTER_ADDR:-$head_node}',
             f"export MASTER_PORT=$(({RENDEZVOUS_PORT_BASE} + SLURM_JOB_ID % {RENDEZVOUS_PORT_SPAN}))", ""]
    lines += _environment_lines(opts, logs)
    lines += _rank_wrapper(opts.preemption)
    lines += ['echo "lmforge: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT, '
              'restart ${SLURM_RESTART_COUNT:-0}"',
              "# One task per rank, each logging to $LOG_DIR/<job id>-rank<rank>.log; a rank that fails ends the step.",
              "rc=0",
              'srun --kill-on-bad-exit=1 --output="$LOG_DIR/%j-rank%t.log" --open-mode=append \\',
              '    bash -c "$RANK_WRAPPER" lmforge-rank \\',
              f"    {_q([python or command[0], '-m', 'launch.diagnose', '--run-dir', run_dir, '--'])} \\",
              f"    {_q(command)} || rc=$?",
              "# A rank killed by a signal left its one-line diagnosis in its log: repeat it here.",
              f'if [ "$rc" -ne 0 ]; then grep -h "^{LINE_PREFIX} .* was killed by" "$LOG_DIR/$SLURM_JOB_ID-rank"*.log || true; fi']
    if opts.preemption:
        lines += ["",
                  'if [ -e "$PREEMPTED_MARKER" ]; then',
                  f"    # the ranks caught SIG{PREEMPT_SIGNAL}, saved a checkpoint together and exited {EXIT_PREEMPTED}: back to the",
                  "    # queue; the requeued job reruns this script and training resumes from that checkpoint",
                  '    echo "lmforge: preempted, checkpoint saved; requeueing job $SLURM_JOB_ID"',
                  '    scontrol requeue "$SLURM_JOB_ID"',
                  "fi"]
    lines += ['exit "$rc"', ""]
    return "\n".join(lines)


def _environment_lines(opts: SlurmOptions, logs: str) -> list[str]:
    """The job's exports: the collective back-end's settings (NCCL on GPUs, gloo's threads on CPU), the network
    interface when given, unbuffered output and the log folder."""
    if opts.gpus_per_node:
        lines = ["# NCCL between GPUs: a failed rank aborts the collectives instead of hanging them.",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
                 "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"]
    else:
        lines = ["# gloo on CPU: one rank per node, using the node's allocated cores as intra-op threads.",
                 "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"]
    if opts.socket_ifname:
        lines.append(f"export NCCL_SOCKET_IFNAME={opts.socket_ifname} GLOO_SOCKET_IFNAME={opts.socket_ifname}")
    return [*lines, "export PYTHONUNBUFFERED=1", f"LOG_DIR={shlex.quote(logs)}", ""]


def _rank_wrapper(preemption: bool) -> list[str]:
    """The bash each srun task runs around the command: a header line in its log, preemption bookkeeping."""
    if not preemption:
        return ["# Each task prints where it runs, then becomes the command.",
                f"RANK_WRAPPER='{_RANK_HEADER}; exec \"$@\"'", ""]
    return [f"# Each task prints where it runs and runs the command; the wrapper shell ignores SIG{PREEMPT_SIGNAL}",
            "# (the signal is for the trainer; Slurm sends it to every process of the step). A command that exits",
            f"# {EXIT_PREEMPTED} marks the job preempted and counts as a success, so srun does not kill the ranks still",
            "# finishing their exit.",
            'export PREEMPTED_MARKER="$LOG_DIR/$SLURM_JOB_ID.preempted"',
            'rm -f "$PREEMPTED_MARKER"',
            f"RANK_WRAPPER='{_RANK_HEADER}",
            f"trap : {PREEMPT_SIGNAL}",
            'rc=0; "$@" || rc=$?',
            f'if [ "$rc" -eq {EXIT_PREEMPTED} ]; then touch "$PREEMPTED_MARKER"; rc=0; fi',
            "exit \"$rc\"'", ""]


def render_prep_scripts(opts: SlurmOptions, python: str, prep_args: Sequence[str], output: str, num_tasks: int,
                        workdir: str, max_parallel: int | None = None) -> tuple[str, str]:
    """``(array_script, merge_script)`` for data prep split into ``num_tasks`` parts.

    Array task ``i`` runs ``lmforge prep PREP_ARGS --output OUTPUT --num-tasks N --no-merge --task-id i``; the
    merge script runs ``lmforge prep merge OUTPUT`` and is submitted with ``--dependency=afterok``
    on the array, so it starts only when every part succeeded. Logs go to ``OUTPUT/slurm/``.
    Node, GPU and preemption options do not apply (one single-node task per part).

    Raises:
        LaunchError: invalid ``opts`` or ``num_tasks`` / ``max_parallel`` below 1.
    """
    opts.validate()
    if num_tasks < 1 or (max_parallel is not None and max_parallel < 1):
        raise LaunchError(f"--num-tasks {num_tasks} / --max-parallel {max_parallel}: both must be >= 1")
    logs = f"{output}/{SLURM_DIR}"
    name = opts.job_name or _job_name("lmforge-prep", output)
    throttle = f"%{max_parallel}" if max_parallel else ""
    array_header = sbatch_header(opts, name, opts.output or f"{logs}/%A_%a-prep.out", workdir,
                                 (f"--array=0-{num_tasks - 1}{throttle}", "--ntasks=1"))
    # --no-merge: the dependent merge job is the one merge (an auto-merge by the last array task would
    # only be repeated by it)
    prep_cmd = [python, "-m", "lmforge", "prep", *prep_args, "--output", output, "--num-tasks", str(num_tasks), "--no-merge"]
    array = ["#!/bin/bash",
             f"# lmforge data prep as a Slurm job array: {num_tasks} parts, array task i prepares part i.",
             "# Rendered by `lmforge launch slurm-prep`; the merge job waits for all of them (afterok).",
             *array_header, "",
             "set -euo pipefail",
             "export PYTHONUNBUFFERED=1",
             "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} RAYON_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
             'echo "lmforge: prep part $SLURM_ARRAY_TASK_ID of ' + str(num_tasks) + ' on $(uname -n)"',
             f'exec {_q(prep_cmd)} --task-id "$SLURM_ARRAY_TASK_ID"', ""]
    merge_header = sbatch_header(opts, f"{name}-merge", f"{logs}/%j-merge.out", workdir, ("--ntasks=1",))
    merge = ["#!/bin/bash",
             f"# lmforge data prep, last step: merge the {num_tasks} parts of {output} (manifest written last).",
             "# Submitted with --dependency=afterok:<array job id>: runs only when every part succeeded.",
             *merge_header, "",
             "set -euo pipefail",
             "export PYTHONUNBUFFERED=1",
             f"exec {_q([python, '-m', 'lmforge', 'prep', 'merge', output])}", ""]
    return "\n".join(array), "\n".join(merge)
