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


PARTITION_PROBE = """
import json, torch, deepspeed
from pretrain.model import build_model, build_model_config, count_parameters
deepspeed.init_distributed("nccl")
config = build_model_config("llama-test", 512, 64, {})
ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {"stage": 3}}
params = list(build_model(config, seed=5, ds_config=ds).parameters())
print(json.dumps({"numel": sum(p.numel() for p in params), "ds_numel": sum(p.ds_numel for p in params),
                  "partition_numel": sum(p.ds_tensor.numel() for p in params), "n_params": count_parameters(config),
                  "devices": sorted({p.ds_tensor.device.type for p in params})}))
torch.distributed.destroy_process_group()
"""


def test_zero3_builds_partitioned_on_gpu(gpu_run):
    """Stage 3 on the device: built partitioned (each parameter empty, its ds_tensor partition on the GPU, the
    ds_numel adding up to the model), trains; the first loss equals stage 0's (same seed, same batch)."""
    import os
    import subprocess
    import sys

    from launch.local import rank_env
    from lmforge_common import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cuda", **rank_env(0, 1, "127.0.0.1", free_port(), 4)}
    proc = subprocess.run([sys.executable, "-c", PARTITION_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert built["numel"] == 0 and built["devices"] == ["cuda"], built  # no parameter holds its full tensor
    assert built["ds_numel"] == built["n_params"] and built["partition_numel"] >= built["n_params"], built  # 1 rank
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
