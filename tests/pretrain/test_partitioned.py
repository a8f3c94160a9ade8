"""ZeRO-3 builds the model partitioned (no rank holds it whole) and the seed alone fixes the initial weights.

One 1-rank and two 2-rank real runs of one step: the first-step loss (same global batch of 4 sequences)
is equal within fp32 rounding on 1 and 2 ranks, and continued pretraining (``model.init_from``) from a
folder holding the seed's weights loads them into the partitions (the same loss again).
"""
import pytest

from tests.pretrain.conftest import losses_by_step

ONE_STEP = ["deepspeed.precision=fp32", "deepspeed.zero_stage=3", "max_steps=1"]


def test_build_model_at_stage3_is_partitioned_and_seeded_like_stage0():
    import os

    import torch

    from lmforge_common import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from pretrain.model import build_model, build_model_config, count_parameters

    deepspeed.init_distributed("gloo")
    try:
        config = build_model_config("llama-test", 512, 64, {})
        plain = build_model(config, seed=5)
        ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {"stage": 3}}
        part = dict(build_model(config, seed=5, ds_config=ds).named_parameters())
        assert all(p.numel() == 0 and hasattr(p, "ds_id") for p in part.values())  # partitioned at construction
        assert sum(p.ds_numel for p in part.values()) == count_parameters(config)
        with deepspeed.zero.GatheredParameters(list(part.values())):
            for name, p in plain.named_parameters():
                assert torch.equal(p, part[name]), name
    finally:
        torch.distributed.destroy_process_group()


def test_zero3_first_step_loss_same_on_1_and_2_ranks_and_from_init_folder(start_run, tmp_path, tokenizer_dir,
                                                                           prepared_dir):
    from pretrain.config import load_config
    from pretrain.model import build_model
    from pretrain.trainer import preflight
    from tests.pretrain.conftest import TINY

    assert start_run("one", 1, *ONE_STEP, "deepspeed.gradient_accumulation_steps=2").wait() == [0]
    assert start_run("two", 2, *ONE_STEP).wait() == [0, 0], (tmp_path / "two" / "rank0.log").read_text()[-3000:]
    cfg = load_config(None, [*TINY, f"data.path={prepared_dir}", f"data.tokenizer={tokenizer_dir}"])
    _, model_config, _ = preflight(cfg)
    build_model(model_config, cfg.seed).save_pretrained(tmp_path / "init")  # the seed's weights, on disk
    assert start_run("init", 2, *ONE_STEP, f"model.init_from={tmp_path / 'init'}").wait() == [0, 0], \
        (tmp_path / "init" / "rank0.log").read_text()[-3000:]
    first = {name: losses_by_step(tmp_path / name)[1] for name in ("one", "two", "init")}
    assert first["two"] == pytest.approx(first["one"], rel=1e-5), first
    assert first["init"] == pytest.approx(first["one"], rel=1e-5), first


def test_stage3_buckets_sized_from_hidden_size_and_user_file_wins(tmp_path):
    import json

    from pretrain.config import TrainConfig
    from pretrain.engine import build_ds_config
    from pretrain.model import build_model_config

    model_config = build_model_config("llama-350m", 2048, 256, {})
    cfg = TrainConfig()
    cfg.deepspeed.zero_stage = 3
    zero = build_ds_config(cfg, 4, model_config=model_config)["zero_optimization"]
    h = 1024  # the HF Trainer's "auto" values for hidden size h
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (h * h, int(0.9 * h * h), 10 * h)
    layer = 4 * h * h + 3 * h * 2816 + 2 * h  # attention, SwiGLU MLP, two norms
    per_layer = (24 * layer + h) // 24  # the final norm shared out
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == int(0.9 * h * h)
    assert zero["sub_group_size"] == per_layer  # one layer: the optimizer step's flat gradient copy stays small
    tiny = build_ds_config(cfg, 4, model_config=build_model_config("llama-test", 2048, 256, {}))["zero_optimization"]
    assert tiny["sub_group_size"] >= tiny["reduce_bucket_size"]  # at least h*h
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_max_live_parameters": 12345, "sub_group_size": 10**9}}))
    cfg.deepspeed.config_file = str(user)
    zero = build_ds_config(cfg, 4, model_config=model_config)["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 12345 and zero["reduce_bucket_size"] == h * h
    assert zero["sub_group_size"] == 10**9
    cfg.deepspeed.zero_stage = 2
    assert "stage3_prefetch_bucket_size" not in build_ds_config(cfg, 4, model_config=model_config)["zero_optimization"]


HEAP_PROBE = """
import sys
import torch
from pretrain.engine import return_large_frees_to_os
if sys.argv[1] == "on":
    assert return_large_frees_to_os()
def heap():
    lines = [ln.split()[0] for ln in open("/proc/self/maps") if ln.rstrip().endswith("[heap]")]
    return sum(int(b, 16) - int(a, 16) for a, b in (ln.split("-") for ln in lines))
x = torch.ones(2**21)
del x  # an 8 MiB free: glibc's dynamic mmap threshold rises to 8 MiB
base = heap()
pairs = [(torch.ones(2**19), torch.ones(16)) for _ in range(32)]  # 2 MiB tensors, a small one after each
print((heap() - base) / 2**20)  # MiB the heap grew: the 2 MiB tensors came from it (holes stay when freed)
"""


def test_large_tensors_are_mmapped_not_taken_from_the_heap():
    import subprocess
    import sys

    grown = {mode: float(subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True,
                                        check=True).stdout) for mode in ("on", "off")}
    assert grown["on"] < 8, grown  # mmapped: unmapped again when freed
    assert grown["off"] >= 60, grown  # glibc's default after a large free: 64 MiB more heap


def test_freed_memory_goes_back_at_zero_3_only_unless_told():
    from pretrain.engine import returns_freed_memory

    assert [returns_freed_memory("auto", stage) for stage in range(4)] == [False, False, False, True]
    assert all(returns_freed_memory("always", stage) for stage in range(4))
    assert not any(returns_freed_memory("never", stage) for stage in range(4))
