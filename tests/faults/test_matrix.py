"""The fault matrix on real 2-rank DeepSpeed runs (llama-test, fp32, ZeRO 2): each fault, then a check that
nothing is lost, i.e. the losses after it match an uninterrupted reference bit for bit.

One reference run serves the kill and signal cases; the rollback case has its own reference: a run from
step 0 without spikes that skips the same global batches after the step the rollback returns to
(``debug.skip_batches_after_step``), as the issue asks. Checkpoint-integrity faults (truncated files, write errors) are in
test_checkpoint_integrity.py.
"""
import json
import random
import time

from lmforge_common import EXIT_PREEMPTED, read_heartbeat
from pretrain.checkpoint import CRASH_POINTS, complete_checkpoints, latest_complete, read_state
from tests.pretrain.conftest import losses_by_step, samples_by_step, start_run  # noqa: F401  (start_run: a fixture)

BASE = ["deepspeed.precision=fp32", "deepspeed.zero_stage=2", "max_steps=12", "checkpoint.save_every_steps=4",
        "data.save_data_indices=true"]
GLOBAL_BATCH = 4
"""Sequences per optimizer step: micro batch 2 (tests.pretrain.conftest.TINY) x 2 ranks."""
ROLLBACK = ["guard.rollback=true", "guard.spike_patience=2", "guard.spike_window=3", "guard.skip_batches=3",
            "guard.max_rollbacks=1"]


CHAIN = ["deepspeed.precision=fp32", "deepspeed.zero_stage=2", "max_steps=12", "checkpoint.save_every_steps=2",
         "checkpoint.keep_last=0", "eval_every_steps=2", "distributed.timeout_minutes=0.5"]
SEED = 20261125


def test_a_chain_of_faults_on_one_run_loses_nothing(start_run, tmp_path):  # noqa: F811
    """One run dir takes every fault in turn and is resumed after each; its losses then equal the reference's."""
    assert start_run("reference", 2, *CHAIN).wait() == [0, 0]
    run = tmp_path / "faulted"
    newest = lambda: read_state(latest_complete(run / "checkpoints"))["step"]  # noqa: E731
    # K non-finite steps in a row: stops before a bad step is saved
    assert start_run("faulted", 2, *CHAIN, "debug.inject_nan_at_steps=[3,4]", "guard.max_consecutive_nonfinite=2").wait() == [2, 2]
    assert newest() == 2 and [s for s, _ in complete_checkpoints(run / "checkpoints")] == [2]
    assert ("lmforge: error: step 4: 2 consecutive non-finite steps (limit guard.max_consecutive_nonfinite=2); stopping"
            in (run / "rank0.log").read_text())
    kill_step = random.Random(SEED).randint(3, 5)  # kill -9 at a random step, seeded
    assert start_run("faulted", 2, *CHAIN, f"debug.kill_at_step={kill_step}").wait() == [-9, -9], kill_step
    c = newest()
    assert c == 2 * (kill_step // 2)
    partial = run / "checkpoints" / f".tmp-step_{c + 2:08d}"
    for point, saved in zip(CRASH_POINTS[1:], (c, c, c + 2)):  # kill -9 at each crash point of the save of c + 2
        ranks = start_run("faulted", 2, *CHAIN, f"debug.crash_in_save={point}")
        code = ranks.procs[0].wait(timeout=300)
        ranks.procs[1].kill()  # as every launcher does when a rank dies (the timeout that ends it alone: the hang case)
        assert code == -9 and newest() == saved, (point, code)
        assert partial.is_dir() == (point != "before_latest"), point  # a partial save is there, and resume ignores it
        assert (run / "checkpoints" / "latest").read_text() == f"step_{c:08d}", point
    assert start_run("faulted", 2, *CHAIN, f"debug.sigterm_at_step={c + 4}", "debug.sigterm_in_eval=true").wait() == [
        EXIT_PREEMPTED, EXIT_PREEMPTED]  # SIGTERM inside the evaluation after step c + 4
    assert newest() == c + 4
    hung = start_run("faulted", 2, *CHAIN, "distributed.timeout_minutes=0.25", f"debug.hang_at_step={c + 5}")
    assert hung.procs[0].wait(timeout=240) == 2
    ended_s = time.time()
    hung.procs[1].kill()
    assert read_heartbeat(run, 1)["step"] == c + 4 and ended_s - read_heartbeat(run, 1)["time_unix_s"] < 15 + 30
    assert (f"lmforge: error: step {c + 5}: a collective waited distributed.timeout_minutes=0.25 for ranks that did not "
            f"arrive; not arrived: rank 1 (host ") in (run / "rank0.log").read_text()
    # SIGTERM while the background export of step c + 6 runs
    assert start_run("faulted", 2, *CHAIN, "checkpoint.export_every_steps=2", f"debug.sigterm_at_step={c + 7}").wait() == [
        EXIT_PREEMPTED, EXIT_PREEMPTED]
    assert newest() == c + 7
    assert start_run("faulted", 2, *CHAIN).wait() == [0, 0]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the next saves removed the partial ones
    reference = losses_by_step(tmp_path / "reference")
    assert sorted(reference) == list(range(1, 13))
    assert losses_by_step(run) == reference  # every step's loss, bit for bit
    export = run / "hf" / f"step_{c + 6:08d}"
    deadline = time.monotonic() + 180
    while not export.is_dir() and time.monotonic() < deadline:  # the export outlives the stopped rank
        time.sleep(1)
    assert (export / "model.safetensors").is_file(), (run / "hf" / f"{export.name}.export.log").read_text()[-2000:]


def sample_visits(run_dir) -> dict[int, list[set[int]]]:
    """Per step (optimizer steps done before it), the samples of all ranks at each visit of that step, in order
    (a step is visited again after a rollback or a resume); one micro batch per rank and step."""
    per_rank = []
    for path in sorted((run_dir / "data-indices").glob("rank*.tsv")):
        visits: dict[int, list[set[int]]] = {}
        for line in path.read_text().splitlines():
            step, ids = line.split("\t")
            visits.setdefault(int(step), []).append({int(i) for i in ids.split(",")})
        per_rank.append(visits)
    return {s: [set().union(*(r[s][i] for r in per_rank)) for i in range(len(per_rank[0][s]))] for s in per_rank[0]}


def test_loss_spike_rolls_back_skips_data_and_a_resume_replays_the_same_data(start_run, tmp_path):  # noqa: F811
    # spike on steps 6 and 7 -> rollback to step 4, skip 3 global batches; killed at step 10, resumed from step 8
    assert start_run("spiked", 2, *BASE, *ROLLBACK, "debug.spike_at_steps=[6,7]", "debug.kill_at_step=10").wait() == [-9, -9]
    log = (tmp_path / "spiked" / "rank0.log").read_text()
    assert "step 7: loss spike for 2 steps from step 6; rolled back to step_00000004 and skipping 3 global batches" in log
    assert read_state(tmp_path / "spiked" / "checkpoints" / "step_00000008")["skipped_samples"] == 3 * GLOBAL_BATCH
    assert start_run("spiked", 2, *BASE, *ROLLBACK, "debug.spike_at_steps=[6,7]").wait() == [0, 0]
    # reference: an uninterrupted run from step 0, without spikes, that skips the same 3 global batches after step 4
    assert start_run("skipped", 2, *BASE, "debug.start_skip_batches=3", "debug.skip_batches_after_step=4").wait() == [0, 0]
    spiked, skipped = losses_by_step(tmp_path / "spiked"), losses_by_step(tmp_path / "skipped")
    assert sorted(skipped) == list(range(1, 13))
    assert spiked == skipped  # every step, bit for bit, through the spike, the rollback, the kill and the resume
    visits = sample_visits(tmp_path / "spiked")
    assert {s: v[-1] for s, v in visits.items()} == samples_by_step(tmp_path / "skipped")
    spike_batches = set().union(*(visits[s][0] for s in (4, 5, 6)))  # steps 5-7 before the rollback
    assert len(visits[4]) == 2 and not spike_batches & set().union(*(v[-1] for v in visits.values()))
    summary = json.loads((tmp_path / "spiked" / "summary.json").read_text())
    assert (summary["rollbacks"], summary["skipped_samples"], summary["consumed_samples"]) == (1, 12, 48)
    records = [json.loads(line) for line in (tmp_path / "spiked" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollback_to_step"] for r in records if "rollback_to_step" in r] == [4]
    assert [s for s, _ in complete_checkpoints(tmp_path / "spiked" / "checkpoints")] == [4, 8, 12]
