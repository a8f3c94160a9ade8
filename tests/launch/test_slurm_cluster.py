"""``lmforge launch slurm`` on a real two-node Slurm cluster (loopback; see conftest.py)."""
import re
import subprocess
import sys
import time

from launch.sbatch_scripts import render_train_script
from launch.slurm import SlurmOptions, submit, write_script
from lmforge_common import EXIT_PREEMPTED, rendezvous_port
from tests.launch.conftest import CRED_EXPIRE_S


def test_two_node_training_runs_one_rank_per_node_and_completes(slurm_cluster, tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "launch", "slurm", str(tiny_config), "--nodes", "2",
                           "--time", "10", f"run_dir={run_dir}"], cwd=tmp_path, env=slurm_cluster.env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+): 2 node\(s\), 2 ranks", proc.stdout).group(1)
    job = slurm_cluster.wait_job(job_id)
    logs = run_dir / "slurm"
    rank_logs = {r: (logs / f"{job_id}-rank{r}.log").read_text() for r in range(2)}
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, rank_logs, slurm_cluster.log_tail())
    nodes = {re.search(rf"lmforge: rank {r} of 2 on node (n\d)", text).group(1) for r, text in rank_logs.items()}
    assert nodes == {"n1", "n2"}
    assert f"rendezvous 127.0.0.1:{rendezvous_port(int(job_id))}" in (logs / f"{job_id}-batch.out").read_text()
    assert (logs / "train.sbatch").read_text().startswith("#!/bin/bash")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert (run_dir / "checkpoints" / "step_00000005").is_dir()
    assert sorted(p.name for p in (run_dir / "data-indices").iterdir()) == ["rank0.tsv", "rank1.tsv"]


def test_srun_tasks_find_rank_and_rendezvous_without_the_script(slurm_cluster, tmp_path):
    """Plain ``srun`` (no lmforge script): ranks and rendezvous derived; the batch shell itself is a world of one."""
    code = ("import os; from pretrain.distributed import discover_ranks, slurm_rendezvous; "
            "print(*discover_ranks(), *slurm_rendezvous(os.environ['SLURM_JOB_NODELIST'], os.environ['SLURM_JOB_ID']))")
    proc = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--label", sys.executable, "-c", code)
    rows = sorted(line.split(": ", 1)[1].split() for line in proc.stdout.splitlines())
    assert [r[:4] for r in rows] == [["Slurm", "0", "0", "2"], ["Slurm", "1", "0", "2"]]
    assert rows[0][4:] == rows[1][4:] and rows[0][4] == "127.0.0.1" and 12000 <= int(rows[0][5]) < 32000
    out = tmp_path / "batch.out"
    in_batch_shell = "from pretrain.distributed import discover_ranks; print(*discover_ranks())"
    job_id = slurm_cluster.run("sbatch", "--parsable", "--nodes=2", "--ntasks=2", f"--output={out}",
                               f"--wrap={sys.executable} -c '{in_batch_shell}'").stdout.strip()
    assert slurm_cluster.wait_job(job_id)["JobState"] == "COMPLETED", out.read_text()
    assert out.read_text().split() == ["none", "0", "0", "1"]


STAND_IN_RANK = f"""
import os, signal, sys, time
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
if restart:
    print("resumed", flush=True)
    sys.exit(0)
caught = []
signal.signal(signal.SIGUSR1, lambda *_: caught.append(1))
print("ready", flush=True)
deadline = time.monotonic() + 60
while not caught and time.monotonic() < deadline:
    time.sleep(0.05)
if caught and os.environ["SLURM_PROCID"] == "1":
    time.sleep(1)  # the slower rank still "saving" when the first exits {EXIT_PREEMPTED}
print("saved" if caught else "no signal", flush=True)
sys.exit({EXIT_PREEMPTED} if caught else 1)
"""


def test_preempted_ranks_get_the_job_requeued(slurm_cluster, tmp_path):
    """The script's side of preemption, with a stand-in for the trainer: USR1 -> exit 75 -> requeue -> rerun.

    (The trainer's side, save and resume, is tested with the real trainer in the fault-tolerance tests.)
    """
    run_dir = tmp_path / "run dir"  # a space: the #SBATCH directives and the script must quote it
    stand_in = tmp_path / "rank.py"
    stand_in.write_text(STAND_IN_RANK)
    script = render_train_script(SlurmOptions(nodes=2), [sys.executable, str(stand_in)], str(run_dir), str(tmp_path))
    job_id = submit(write_script(run_dir / "slurm" / "train.sbatch", script), env=slurm_cluster.env)
    rank_logs = [run_dir / "slurm" / f"{job_id}-rank{r}.log" for r in range(2)]
    deadline = time.monotonic() + 30
    while not all(p.exists() and "ready" in p.read_text() for p in rank_logs):
        assert time.monotonic() < deadline, slurm_cluster.log_tail()
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    slurm_cluster.wait_job(job_id, 30, until=lambda job: job["Restarts"] == "1" and job["JobState"] == "PENDING")
    job = slurm_cluster.wait_job(job_id, 90 + CRED_EXPIRE_S)  # the requeued job starts after cred_expire
    texts = [p.read_text() for p in rank_logs]
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, texts)
    for text in texts:  # both ranks: first run signalled and "saved", then the requeued run
        marks = [text.find(m) for m in ("restart 0", "ready", "saved", "restart 1", "resumed")]
        assert -1 not in marks and marks == sorted(marks), text
    assert "requeueing job" in (run_dir / "slurm" / f"{job_id}-batch.out").read_text()


def test_usr1_makes_the_real_trainer_save_then_slurm_requeues_and_it_resumes_to_completion(slurm_cluster, tiny_config, tmp_path):
    import json

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "launch", "slurm", str(tiny_config), "--nodes", "2",
                           "--time", "10", f"run_dir={run_dir}", "max_steps=400", "log_every_steps=1"],
                          cwd=tmp_path, env=slurm_cluster.env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and any(json.loads(line).get("step", 0) >= 3 for line in metrics.read_text().splitlines())):
        assert time.monotonic() < deadline, slurm_cluster.log_tail()
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    slurm_cluster.wait_job(job_id, 120, until=lambda job: job["Restarts"] == "1" and job["JobState"] == "PENDING")
    saved = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert saved and "step_00000400" not in saved  # the preemption save, before the end
    job = slurm_cluster.wait_job(job_id, 240 + CRED_EXPIRE_S)  # the requeued job starts by itself after cred_expire
    rank0 = (run_dir / "slurm" / f"{job_id}-rank0.log").read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, rank0[-2000:], slurm_cluster.log_tail(40))
    assert "stopping at step" in rank0 and f"exit code {EXIT_PREEMPTED}" in rank0
    assert re.search(r"resumed from step_\d{8}", rank0)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 400


def test_a_rank_killed_under_srun_ends_the_step_and_is_diagnosed_in_its_log_and_the_batch_log(slurm_cluster, tmp_path):
    """Rank 1 writes a heartbeat (step 7) and SIGKILLs itself; rank 0 would sleep 120 s: srun --kill-on-bad-exit
    ends it, the watcher's line names the signal, rank, node, step and the OOM killer, and the batch log repeats it."""
    from tests.launch.test_diagnose import _rank

    run_dir = tmp_path / "run"
    script = render_train_script(SlurmOptions(nodes=2), [sys.executable, "-c", _rank(run_dir, 1, 9, "SLURM_PROCID")],
                                 str(run_dir), str(tmp_path))
    start = time.monotonic()
    job_id = submit(write_script(run_dir / "slurm" / "train.sbatch", script), env=slurm_cluster.env)
    job = slurm_cluster.wait_job(job_id, 60)
    assert job["JobState"] == "FAILED" and time.monotonic() - start < 60, job
    rank_log = (run_dir / "slurm" / f"{job_id}-rank1.log").read_text()
    batch_log = (run_dir / "slurm" / f"{job_id}-batch.out").read_text()
    for text in (rank_log, batch_log):
        line = next((ln for ln in text.splitlines() if "was killed by" in ln), None)
        assert line and line.startswith("lmforge: rank 1 of 2 on node n2 was killed by SIGKILL after completing step 7; "
                                        "likely the out-of-memory killer: its last sampled RSS was"), text
    assert "killed by" not in (run_dir / "slurm" / f"{job_id}-rank0.log").read_text()  # the stopped rank is not blamed
