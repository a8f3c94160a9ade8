"""Fault tolerance on real DeepSpeed runs: kill -9, resume and a world-size change, the time budget, SIGUSR1 and a skipped
NaN step, background exports (kill inside a save and a non-finite streak: tests/faults/test_matrix.py)."""
import json
import random
import signal
import time

import pytest

from lmforge_common import EXIT_PREEMPTED
from pretrain.checkpoint import complete_checkpoints, latest_complete, read_state
from tests.pretrain.conftest import losses_by_step, samples_by_step

FP32_ZERO2 = ["deepspeed.precision=fp32", "deepspeed.zero_stage=2", "max_steps=12", "checkpoint.save_every_steps=4",
              "data.save_data_indices=true"]


@pytest.fixture(scope="module")
def rng():
    seed = 20261122
    print(f"kill step seed {seed}")
    return random.Random(seed)


def test_kill_at_random_step_then_resume_is_bit_identical_and_world_size_can_change(start_run, tmp_path, rng):
    assert start_run("uninterrupted", 2, *FP32_ZERO2).wait() == [0, 0]
    kill_step = rng.randint(5, 11)
    assert start_run("killed", 2, *FP32_ZERO2, f"debug.kill_at_step={kill_step}").wait() == [-9, -9]
    resumed_from = latest_complete(tmp_path / "killed" / "checkpoints")
    assert read_state(resumed_from)["step"] == 4 * (kill_step // 4)
    assert start_run("killed", 2, *FP32_ZERO2).wait() == [0, 0]
    reference = losses_by_step(tmp_path / "uninterrupted")
    assert sorted(reference) == list(range(1, 13))
    assert losses_by_step(tmp_path / "killed") == reference  # every logged loss, bit for bit
    # 2 -> 1 rank from the step-8 checkpoint, same global batch: the same samples, in the same steps
    (tmp_path / "one_rank").mkdir()
    import shutil

    shutil.copytree(tmp_path / "uninterrupted" / "checkpoints", tmp_path / "one_rank" / "checkpoints")
    assert start_run("one_rank", 1, *FP32_ZERO2, "checkpoint.resume=step_00000008",
                     "deepspeed.gradient_accumulation_steps=2").wait() == [0]
    two, one = samples_by_step(tmp_path / "uninterrupted"), samples_by_step(tmp_path / "one_rank")
    assert sorted(one) == [8, 9, 10, 11]
    assert all(one[s] == two[s] for s in one)
    one_losses = losses_by_step(tmp_path / "one_rank")
    assert all(abs(one_losses[s] - reference[s]) < 1e-4 * abs(reference[s]) for s in (9, 10, 11, 12))


def test_time_budget_saves_and_exits_for_requeue(start_run, tmp_path):
    assert start_run("budget", 1, "max_steps=50", "preemption.max_minutes=0.0001").wait() == [EXIT_PREEMPTED]
    assert read_state(latest_complete(tmp_path / "budget" / "checkpoints"))["step"] == 1
    assert not (tmp_path / "budget" / "summary.json").exists()


def test_sigusr1_saves_exits_75_then_resumes_and_nan_step_is_skipped(start_run, tmp_path):
    run_dir = tmp_path / "preempt"
    ranks = start_run("preempt", 2, "max_steps=40", "debug.inject_nan_at_steps=[3]")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= 5:
            break
        time.sleep(0.2)
    ranks.procs[1].send_signal(signal.SIGUSR1)  # one rank only: all ranks must agree
    assert ranks.wait() == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    stopped_at = read_state(latest_complete(run_dir / "checkpoints"))["step"]
    assert 5 <= stopped_at < 40
    assert start_run("preempt", 2, "max_steps=40", "debug.inject_nan_at_steps=[3]").wait() == [0, 0]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    step3 = [r for r in records if r.get("step") == 3 and "loss" in r][0]
    assert step3["skipped_steps"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["skipped_steps"] == 1
    assert summary["val_loss_end"] < summary["val_loss_start"]


def test_export_every_steps_writes_verified_folders_in_the_background(start_run, tmp_path):
    assert start_run("exporting", 1, "max_steps=4", "checkpoint.save_every_steps=2", "checkpoint.export_every_steps=2",
                     "checkpoint.keep_last=1").wait() == [0]
    hf = tmp_path / "exporting" / "hf"
    assert (hf / "step_00000002" / "model.safetensors").is_file(), (hf / "step_00000002.export.log").read_text()[-2000:]
    assert (hf / "step_00000002" / "config.json").is_file()
    # the step-2 checkpoint outlived keep_last=1 only while its export was running; the newest is kept
    assert [s for s, _ in complete_checkpoints(tmp_path / "exporting" / "checkpoints")][-1] == 4


def test_stop_is_polled_every_n_steps_and_at_the_last_step():
    """In-process, a world of one (the all-reduce is the identity): a signal is acted on at the next poll step."""
    import os

    from pretrain.preemption import StopPolicy

    stop = StopPolicy(["SIGUSR1"], poll_every_steps=4, max_steps=10)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signalled
        assert [stop.poll(s).reason for s in (1, 2, 3, 4)] == ["", "", "", "signal"]
        assert [stop.poll(s, save_timer_due=True).save_due for s in (5, 8)] == [False, True]
        assert [stop.poll(s).reason for s in (9, 10)] == ["", "signal"]  # 10 is the last step
    finally:
        stop.restore()
