"""The divergence guard's decisions and the stall line of a timed-out collective, in-process (no ranks)."""
import math

import pytest

from lmforge_common import heartbeat_path, write_json_atomic
from pretrain.guard import DivergenceGuard, RollbackRequest, TrainingDiverged
from pretrain.heartbeat import Heartbeat, is_timeout, stall_message


def feed(guard: DivergenceGuard, losses, first_step: int = 1, applied: bool = True) -> list:
    return [guard.update(first_step + i, applied and math.isfinite(x), x) for i, x in enumerate(losses)]


def test_spikes_are_logged_only_without_rollback_and_stay_out_of_the_mean():
    guard = DivergenceGuard(max_consecutive=3, spike_factor=2.0, spike_window=3)
    assert feed(guard, [4.0, 4.0, 4.0, 9.0, 9.0, 9.0, 9.0, 4.0]) == [None] * 8
    assert guard.spikes == 4  # 9 > 2 x 4 every time: spike losses do not raise the mean
    assert not guard.is_spike(8.0) and guard.is_spike(8.1)


def test_a_spike_streak_of_patience_steps_asks_for_a_rollback_before_its_first_step_until_the_limit():
    guard = DivergenceGuard(max_consecutive=3, spike_factor=2.0, spike_window=2, rollback=True, spike_patience=2,
                            max_rollbacks=2, rollbacks_done=1)
    out = feed(guard, [4.0, 4.0, 9.0, 4.0, 9.0, 9.0])  # one spike step alone does not trigger
    assert out[:5] == [None] * 5
    assert out[5] == RollbackRequest(step=6, first_bad_step=5, reason="loss spike for 2 steps")
    assert guard.rollbacks_done == 2 and guard.spike_streak == 0
    with pytest.raises(TrainingDiverged, match=r"^step 8: loss spike for 2 steps \(limit guard.spike_patience=2; "
                                               r"2 of guard.max_rollbacks=2 rollbacks used\); stopping$"):
        feed(guard, [9.0, 9.0], first_step=7)


def test_a_nonfinite_streak_rolls_back_with_rollback_on_and_stops_without():
    on = DivergenceGuard(max_consecutive=2, spike_factor=3.0, spike_window=5, rollback=True, max_rollbacks=1)
    assert feed(on, [float("nan"), float("inf")], first_step=4)[-1] == RollbackRequest(4 + 1, 4, "2 consecutive non-finite steps")
    off = DivergenceGuard(max_consecutive=2, spike_factor=3.0, spike_window=5)
    with pytest.raises(TrainingDiverged, match=r"^step 5: 2 consecutive non-finite steps \(limit "
                                               r"guard.max_consecutive_nonfinite=2\); stopping$"):
        feed(off, [3.0, 3.0], first_step=4, applied=False)


def test_stall_line_names_the_rank_behind_or_with_a_stale_heartbeat(tmp_path):
    Heartbeat(tmp_path, 0).beat(7)
    Heartbeat(tmp_path, 1).beat(6)
    line = stall_message(tmp_path, 3, timeout_minutes=0.5)
    assert line.startswith("step 8: a collective waited distributed.timeout_minutes=0.5 for ranks that did not arrive; "
                           "not arrived: rank 1 (host ")
    assert "last finished step 6), rank 2 (no heartbeat)" in line
    beat = {"rank": 1, "host": "n1", "pid": 42, "step": 7, "time_unix_s": 1000.0}
    write_json_atomic(heartbeat_path(tmp_path, 1), beat)  # same step, 60 s older than rank 0's fresh one
    line = stall_message(tmp_path, 2, timeout_minutes=0.5, now_s=1060.0)
    assert "not arrived: rank 1 (host n1 pid 42, last finished step 7)" in line


def test_is_timeout_knows_gloo_and_nccl_messages():
    assert is_timeout(RuntimeError("[gloo/transport/tcp/pair.cc:534] Timed out waiting 6000ms for recv operation"))
    assert is_timeout(RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5)"))
    assert not is_timeout(RuntimeError("CUDA out of memory"))


def test_the_model_card_lists_rollbacks_in_the_training_section():
    from types import SimpleNamespace

    from pretrain.export.model_card import _training

    cfg = {"deepspeed": {"micro_batch_size": 2, "gradient_accumulation_steps": 1, "precision": "fp32"},
           "optim": {"schedule": "constant", "lr": 1e-3, "warmup_steps": 0, "betas": [0.9, 0.95], "weight_decay": 0.1,
                     "grad_clip": 1.0}, "max_steps": 10}
    info = SimpleNamespace(config=cfg, state={"tokens": 100, "step": 10, "rollbacks": 1, "skipped_samples": 1200},
                           manifest={"seq_len": 64}, train_records=[])
    assert "- loss-spike rollbacks: 1 (1,200 sequences skipped)" in _training(info, zero_stage=2)
