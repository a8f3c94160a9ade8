"""A real Slurm cluster on loopback for the launcher tests, and the tiny training config they share.

``slurm_cluster`` (session): munged with a key made for the test, slurmctld, and two slurmd
(``slurmd -N n1`` / ``-N n2``, ``NodeName=n[1-2] NodeAddr=127.0.0.1 Port=[p1-p2]``), all state,
spool, sockets and logs in one temp dir, each daemon a foreground child of the test process,
stopped and removed afterwards. Up in about a second. Without the binaries, or not as root (slurmd
must be root to start job steps), the tests that need it skip with the reason; with ``CI=true``
they fail instead: CI installs Slurm and runs as root, so a skip there would hide a broken launcher.
"""
from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import cast

import pytest

CRED_EXPIRE_S = 20
"""Job credential lifetime; also how long Slurm holds a requeued job before it may start again
(default 120 s). Forcing an earlier start with ``scontrol update StartTime=now`` can launch the job
while its previous credential is still revoked on the nodes, and the launch then fails."""
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                   "PREEMPTED"}


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(reason: str | None) -> None:
    """Skip with ``reason`` (fail on CI, where every launcher dependency is installed)."""
    if reason:
        (pytest.fail if on_ci() else pytest.skip)(f"{reason} (CI=true: failing instead of skipping)" if on_ci() else reason)


def which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")


def _consecutive_free_ports(n: int) -> int:
    """First of ``n`` consecutive free TCP ports in 10000-11999 (below the jobs' rendezvous ports 12000-31999)."""
    for _ in range(200):
        base = random.randrange(10000, 12000 - n)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports in 10000-11999")


class SlurmCluster:
    """slurmctld + slurmd n1, n2 on 127.0.0.1; ``env`` points Slurm commands at it."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
        self.env = {**clean, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for sub in ("munge", "state", "log", "spool/n1", "spool/n2"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o711)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        port = _consecutive_free_ports(3)
        user = pwd.getpwuid(os.getuid()).pw_name
        r = self.root
        self.conf.write_text(f"""# lmforge test cluster: two slurmd on loopback, everything under {r}
ClusterName=lmforgetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
FirstJobId={random.randrange(1000, 15000)}
MinJobAge=3600
KillWait=5
ReturnToService=2
MpiDefault=none
NodeName=n[1-2] NodeAddr=127.0.0.1 Port=[{port + 1}-{port + 2}] CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout_s: float = 30) -> None:
        r = self.root
        munge = r / "munge"
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.socket}", f"--key-file={munge / 'munge.key'}",
                     f"--pid-file={munge / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                     f"--seed-file={munge / 'munged.seed'}"], "munged")
        self._wait(lambda: self.socket.exists(), 10, "munged socket")
        self._spawn(["slurmctld", "-D", "-i"], "slurmctld")
        for node in ("n1", "n2"):
            self._spawn(["slurmd", "-D", "-N", node], f"slurmd-{node}")
        self._wait(self._nodes_idle, timeout_s, "both nodes idle")

    def _spawn(self, cmd: list[str], name: str) -> None:
        exe = which(cmd[0])
        assert exe is not None, f"{cmd[0]} not on PATH"  # the fixture skips unless every Slurm binary is found
        out = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs.append(subprocess.Popen([exe, *cmd[1:]], env=self.env, stdout=out, stderr=subprocess.STDOUT))
        out.close()

    def _nodes_idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return states.get("n1") == "idle" and states.get("n2") == "idle"

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [cast(list[str], p.args)[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"test Slurm cluster: no {what} after {timeout_s} s (exited: {dead})\n{self.log_tail()}")
            time.sleep(0.2)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([which(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n{self.log_tail()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, NodeList ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout_s: float = 90, until=lambda job: job["JobState"] in TERMINAL_STATES) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout_s} s\n{self.log_tail()}")
            time.sleep(0.3)

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def slurm_unavailable() -> str | None:
    missing = [b for b in SLURM_BINARIES if which(b) is None]
    if missing:
        return f"Slurm / munge not installed (missing {', '.join(missing)}; make system-deps installs them as root)"
    if os.geteuid() != 0:
        return "the test Slurm cluster needs root: slurmd starts job steps as their user"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    require(slurm_unavailable())
    root = Path(tempfile.mkdtemp(prefix="lmf-slurm-"))  # short: munge and slurmd put unix sockets here
    cluster = SlurmCluster(root)
    try:
        cluster.write_config()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory, tokenizer_dir, prepared_dir) -> Path:
    """A training config of a few seconds on CPU: llama-test, 5 steps, micro batch 2, one eval batch."""
    path = tmp_path_factory.mktemp("launch-config") / "tiny.yaml"
    path.write_text(f"""max_steps: 5
show_progress: false
model: {{preset: llama-test}}
data: {{path: {prepared_dir}, tokenizer: {tokenizer_dir}, eval_batches: 1, save_data_indices: true}}
deepspeed: {{micro_batch_size: 2}}
""")
    return path
