"""Slurm job options, their validation, the ``#SBATCH`` header and submission with sbatch.

The scripts themselves are rendered by :mod:`launch.sbatch_scripts`; this module knows what the
options mean to Slurm. Option names follow sbatch's (``--partition``, ``--time`` ...), so the
rendered header reads like a hand-written one.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.errors import LaunchError

log = logging.getLogger(__name__)

_TIME_RE = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                      r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
MAX_SIGNAL_GRACE_S = 65535
"""sbatch's upper bound for the ``--signal=SIG@seconds`` lead time."""


def parse_time_s(text: str) -> int | None:
    """Seconds of a Slurm time limit; None for ``UNLIMITED`` / ``INFINITE``.

    Formats (sbatch(1)): ``minutes``, ``minutes:seconds``, ``hours:minutes:seconds``, ``days-hours``,
    ``days-hours:minutes``, ``days-hours:minutes:seconds``.

    Raises:
        LaunchError: any other text.
    """
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME_RE.match(text)
    if not m:
        raise LaunchError(f"--time {text!r} is not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    if m["d"] is not None:
        return int(m["d"]) * 86400 + int(m["dh"]) * 3600 + int(m["dm"] or 0) * 60 + int(m["ds"] or 0)
    if m["c"] is not None:
        return int(m["a"]) * 3600 + int(m["b"]) * 60 + int(m["c"])
    return int(m["a"]) * 60 + int(m["b"] or 0)


@dataclass
class SlurmOptions:
    """What to ask Slurm for; each field maps to the sbatch option of the same name."""

    nodes: int = 1
    """Nodes (``--nodes``)."""
    gpus_per_node: int = 0
    """GPUs per node (``--gpus-per-node``); one rank per GPU. 0 = CPU training, one rank per node."""
    cpus_per_task: int | None = None
    """CPU cores per rank (``--cpus-per-task``); also each rank's ``OMP_NUM_THREADS``. None = Slurm's default."""
    partition: str | None = None
    """Partition (``--partition``)."""
    account: str | None = None
    """Account charged (``--account``)."""
    qos: str | None = None
    """Quality of service (``--qos``)."""
    time: str | None = None
    """Time limit, Slurm format (``--time``, e.g. ``2-00:00:00``); None = the partition's default."""
    constraint: str | None = None
    """Node features (``--constraint``, e.g. ``a100&ib``)."""
    exclusive: bool = False
    """Whole nodes, shared with no other job (``--exclusive``)."""
    mem: str | None = None
    """Memory per node (``--mem``), megabytes or with a K/M/G/T suffix; ``0`` = all of it."""
    output: str | None = None
    """The batch script's own log (``--output``, ``%j`` = job id); None = a file in the run's slurm/ folder."""
    job_name: str | None = None
    """Job name (``--job-name``); None = ``lmforge-<run dir name>``."""
    preemption: bool = True
    """Ask for ``PREEMPT_SIGNAL`` before the time limit and requeue the job when the ranks exit ``EXIT_PREEMPTED``."""
    signal_grace_s: int = 300
    """Seconds before the time limit at which Slurm sends the preemption signal (``--signal=USR1@grace``)."""
    socket_ifname: str | None = None
    """Network interface for NCCL and gloo traffic (``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME``), e.g. ``ib0``."""

    @property
    def ranks_per_node(self) -> int:
        """One rank per GPU; on CPU one rank per node (it uses the node's cores through intra-op threads)."""
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        """Data-parallel ranks of the job."""
        return self.nodes * self.ranks_per_node

    def validate(self) -> None:
        """Raise one :class:`LaunchError` naming every bad option with its value and what is allowed."""
        problems = []
        for name, value, low in (("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                                 ("--cpus-per-task", self.cpus_per_task, 1)):
            if value is not None and value < low:
                problems.append(f"{name} {value} (allowed: >= {low})")
        if self.mem is not None and not _MEM_RE.match(self.mem):
            problems.append(f"--mem {self.mem!r} (allowed: megabytes or a number with K/M/G/T, e.g. 64G)")
        time_s = None
        if self.time is not None:
            try:
                time_s = parse_time_s(self.time)
            except LaunchError as exc:
                problems.append(str(exc))
        if self.preemption:
            if not 1 <= self.signal_grace_s <= MAX_SIGNAL_GRACE_S:
                problems.append(f"--signal-grace-s {self.signal_grace_s} (allowed: 1 .. {MAX_SIGNAL_GRACE_S})")
            elif time_s is not None and self.signal_grace_s >= time_s:
                problems.append(f"--signal-grace-s {self.signal_grace_s} is not below --time {self.time} ({time_s} s): "
                                "the job would be signalled as it starts")
        for name in ("partition", "account", "qos", "constraint", "output", "job_name", "socket_ifname"):
            value = getattr(self, name)
            if value is not None and (not value or any(c.isspace() for c in value)):
                problems.append(f"--{name.replace('_', '-')} {value!r} (allowed: a non-empty word without spaces)")
        if problems:
            raise LaunchError("invalid Slurm options: " + "; ".join(problems))


def sbatch_header(opts: SlurmOptions, job_name: str, output: str, workdir: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``#SBATCH`` lines for ``opts`` (unset options are left to the cluster's defaults).

    ``extra`` lines (e.g. ``--nodes=2``) come right after the job name, the output and the
    working directory last.
    """
    lines = [f"--job-name={job_name}", *extra]
    if opts.cpus_per_task:
        lines.append(f"--cpus-per-task={opts.cpus_per_task}")
    for name in ("partition", "account", "qos", "time", "constraint", "mem"):
        value = getattr(opts, name)
        if value is not None:
            lines.append(f"--{name}={value}")
    if opts.exclusive:
        lines.append("--exclusive")
    lines += [f"--chdir={workdir}", f"--output={output}"]
    return [f"#SBATCH {_quoted(line)}" for line in lines]


def _quoted(option: str) -> str:
    """``--name=value`` with the value in double quotes when it has spaces (sbatch reads quoted directives)."""
    name, sep, value = option.partition("=")
    return f'{name}="{value}"' if sep and any(c.isspace() for c in value) else option


def write_script(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (mode 0755) through a temp file and rename, so no half script is submitted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def submit(script: str | Path, dependency: str | None = None, env: dict[str, str] | None = None) -> str:
    """Submit ``script`` with ``sbatch --parsable``; returns the job id.

    Args:
        dependency: an sbatch dependency such as ``afterok:123``.
        env: the environment sbatch sees (and, through ``--export=ALL``, the job); default ours.

    Raises:
        LaunchError: sbatch is not on PATH or refused the job (its message included).
    """
    exe = shutil.which("sbatch")
    if exe is None:
        raise LaunchError(f"sbatch not found on PATH: submit {script} from a Slurm login node (or see it with --dry-run)")
    cmd = [exe, "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch {script} failed (exit {proc.returncode}): {' '.join(proc.stderr.split())}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise LaunchError(f"sbatch {script}: unexpected reply {proc.stdout.strip()!r} (expected a job id)")
    log.info("submitted %s as job %s", script, job_id)
    return job_id
