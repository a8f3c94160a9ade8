"""ZeRO stages 0-3 on 2 real ranks: the loss falls, and stages 2 and 3 track stage 0 on the same data and seed."""
import json

import pytest

from tests.pretrain.conftest import losses_by_step

COMMON = ["deepspeed.precision=fp32", "max_steps=8", "optim.lr=5e-3"]


def test_zero_stages_agree_and_learn(start_run, tmp_path):
    variants = {
        "zero0": ["deepspeed.zero_stage=0"],
        "zero1": ["deepspeed.zero_stage=1"],
        "zero2": ["deepspeed.zero_stage=2", "deepspeed.activation_checkpointing=true"],
        "zero3": ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"],
    }
    for name, extra in variants.items():
        assert start_run(name, 2, *COMMON, *extra).wait() == [0, 0], (tmp_path / name / "rank0.log").read_text()[-3000:]
    losses = {name: losses_by_step(tmp_path / name) for name in variants}
    for name, by_step in losses.items():
        assert by_step[8] < by_step[1] - 0.3, name
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["val_loss_end"] < summary["val_loss_start"], name
    for name in ("zero1", "zero2", "zero3"):
        for step in range(1, 9):
            assert losses[name][step] == pytest.approx(losses["zero0"][step], rel=2e-3), (name, step)
