"""One-GPU runs: nccl + bf16 training with MFU, compile, ZeRO-3 partitioned construction, and every attention
kernel's document masking on the device. Short: llama-test, a few steps each."""
import json

import pytest
import torch

from tests.pretrain.conftest import losses_by_step
from tests.pretrain.test_attention import assert_document_masked


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_nccl_bf16_run_reports_mfu(gpu_run):
    """DS_ACCELERATOR=cuda: pretrain.distributed initialises nccl; bf16 steps; MFU from the device's peak."""
    run_dir = gpu_run("bf16", "max_steps=3")
    train = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 for r in train), train  # a known GPU has a peak


def test_compiled_losses_equal_eager_on_gpu(gpu_run):
    steps = ["max_steps=3", "deepspeed.precision=fp32"]
    eager, compiled = losses_by_step(gpu_run("eager", *steps)), losses_by_step(gpu_run("compiled", *steps, "compile=true"))
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3), (step, eager, compiled)


def test_zero3_builds_partitioned_on_gpu(gpu_run):
    """Stage 3 on the device: built partitioned, trains; the first loss equals stage 0's (same seed, same batch)."""
    steps = ["max_steps=1", "deepspeed.precision=fp32"]
    stage0 = losses_by_step(gpu_run("z0", *steps, "deepspeed.zero_stage=0"))
    stage3 = losses_by_step(gpu_run("z3", *steps, "deepspeed.zero_stage=3"))
    assert stage3[1] == pytest.approx(stage0[1], rel=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention", "flash_attention_2"])
def test_each_attention_kernel_keeps_document_masking_on_gpu(attention):
    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn not installed")
        with torch.autocast("cuda", dtype=torch.bfloat16):  # flash-attn runs in half precision only
            assert_document_masked(attention, "cuda", tolerance=3e-2)
        return
    assert_document_masked(attention, "cuda")


def test_flex_attention_trains_on_gpu(gpu_run):
    losses = losses_by_step(gpu_run("flex", "max_steps=2", "model.attention=flex_attention"))
    assert sorted(losses) == [1, 2]
