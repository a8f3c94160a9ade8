"""The optimizer lmforge hands DeepSpeed: torch's fused AdamW, the default loop's update within fp32 rounding
(the fused kernel orders its operations differently), without the loop's temporaries (issue 14: they were
part of ZeRO-3's peak)."""
from __future__ import annotations

import torch

from pretrain.config import TrainConfig
from pretrain.engine import build_optimizer


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))


def test_fused_adamw_with_decay_on_matrices_only_matches_the_loop_within_rounding():
    cfg = TrainConfig()
    cfg.optim.weight_decay = 0.1
    fused_model, loop_model = _model(0), _model(0)
    fused = build_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] is True
    assert [len(g["params"]) for g in fused.param_groups] == [2, 4]  # 2 matrices; 2 biases + norm weight and bias
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    loop = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in
                              [{"params": [loop_model[0].weight, loop_model[2].weight], "weight_decay": 0.1},
                               {"params": [loop_model[0].bias, loop_model[1].weight, loop_model[1].bias,
                                           loop_model[2].bias], "weight_decay": 0.0}]],
                             lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, foreach=False)
    torch.manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 16)
        for model, opt in ((fused_model, fused), (loop_model, loop)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_zero3_fp32_master_weights_are_the_parameter_partitions_and_sub_groups_are_one_layer():
    """In fp32 DeepSpeed's stage 3 keeps no second copy of the partitions (pretrain.engine.share_fp32_master_weights),
    splits the optimizer step into sub-groups of a layer or so, and steps them with the fused AdamW."""
    import os

    from lmforge_common import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from pretrain.engine import build_ds_config, initialize_engine
    from pretrain.model import build_model, build_model_config

    deepspeed.init_distributed("gloo")
    try:
        cfg = TrainConfig()
        cfg.deepspeed.precision, cfg.deepspeed.zero_stage, cfg.deepspeed.micro_batch_size = "fp32", 3, 1
        cfg.max_steps = 2
        config = build_model_config("llama-test", 512, 64, {})
        ds_config = build_ds_config(cfg, 1, model_config=config)
        engine = initialize_engine(build_model(config, seed=5, ds_config=ds_config), cfg, world_size=1)
        opt = engine.optimizer
        assert opt.optimizer.defaults["fused"] is True
        assert len(opt.fp32_partitioned_groups_flat) > 2  # sub-groups (sub_group_size from the model)
        assert max(t.numel() for t in opt.fp32_partitioned_groups_flat) < 2 * ds_config["zero_optimization"]["sub_group_size"]
        for master, partition in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat):
            assert master.data_ptr() == partition.data_ptr()  # one copy
        before = [t.clone() for t in opt.fp32_partitioned_groups_flat]
        ids = torch.randint(0, 512, (1, 64))
        for _ in range(2):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        assert torch.isfinite(loss)
        for old, master, partition in zip(before, opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat):
            assert master.data_ptr() == partition.data_ptr() and not torch.equal(old, master)
    finally:
        torch.distributed.destroy_process_group()
