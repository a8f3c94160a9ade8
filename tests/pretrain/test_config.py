from importlib import resources
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.engine import build_ds_config
from pretrain.errors import ConfigError

CONFIG_DIR = Path(str(resources.files("pretrain") / "configs"))


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path, ["data.path=d", "data.tokenizer=t"])
    assert cfg.max_steps > 0


def test_overrides_win_and_ds_config_is_generated():
    cfg = load_config(CONFIG_DIR / "demo.yaml", ["data.path=d", "data.tokenizer=t", "deepspeed.zero_stage=3",
                                                  "deepspeed.gradient_accumulation_steps=4", "optim.grad_clip=0.5",
                                                  "model.overrides.num_hidden_layers=2"])
    ds = build_ds_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == cfg.deepspeed.micro_batch_size * 4 * 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert cfg.model.overrides == {"num_hidden_layers": 2}


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=d", "data.tokenizer=t", "deepspeed.zero_stage=5", "deepspeed.precision=fp8",
                           "optim.schedule=step", "max_steps=0"])
    msg = str(err.value)
    for part in ("deepspeed.zero_stage=5 (allowed: 0, 1, 2, 3)", "deepspeed.precision='fp8' (allowed: 'fp32', 'bf16', 'fp16')",
                 "optim.schedule='step'", "max_steps=0 (allowed: >= 1)"):
        assert part in msg
    assert "\n" not in msg


def test_unknown_keys_bad_values_and_bad_choices_all_in_one_message():
    """The new user's command of issue 13: every problem at once, each with what is allowed."""
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "demo.yaml", ["data.path=d", "data.tokenizer=t", "optim.lrr=1", "deepspeed.zero_stage=5",
                                               "model.preset=llama-huge", "deepspeed.micro_batch_size=0",
                                               "data.blend=[{path: a, weigth: 2}]", "checkpoint.kep_last=2"])
    msg = str(err.value)
    for part in ("optim.lrr: unknown key (allowed here: lr, min_lr_ratio,", "deepspeed.zero_stage=5 (allowed: 0, 1, 2, 3)",
                 "model.preset='llama-huge' (allowed: bert-base,", "deepspeed.micro_batch_size=0 (allowed: >= 1)",
                 "data.blend[0].weigth: unknown key (allowed here: path, weight, max_epochs)", "checkpoint.kep_last: unknown key"):
        assert part in msg, part
    assert "\n" not in msg and msg.startswith(str(CONFIG_DIR / "demo.yaml"))


def test_enumerated_fields_are_literal_types():
    import typing

    from pretrain.config import DebugConfig, DeepSpeedConfig, OptimConfig

    hints = {**typing.get_type_hints(DeepSpeedConfig), **typing.get_type_hints(OptimConfig)}
    hints["crash_in_save"] = typing.get_type_hints(DebugConfig)["crash_in_save"]
    for name in ("zero_stage", "precision", "schedule", "crash_in_save"):
        assert typing.get_origin(hints[name]) is typing.Literal, name


def test_unknown_key_wrong_type_and_missing_data_are_named(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.zero_stag"):
        load_config(None, ["deepspeed.zero_stag=2"])
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, ["max_steps=many"])
    with pytest.raises(ConfigError, match=r"data.tokenizer is required; data.path is required \(or data.blend or data.raw_inputs\)"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_user_ds_config_merges_but_cannot_change_what_lmforge_owns(tmp_path):
    import json

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.3,
                                "train_micro_batch_size_per_gpu": 8}))
    base = ["data.path=d", "data.tokenizer=t", "deepspeed.micro_batch_size=8", f"deepspeed.config_file={user}",
            "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"]
    ds = build_ds_config(load_config(None, base), world_size=2)
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "offload_param": {"device": "cpu", "pin_memory": False}}
    assert ds["gradient_clipping"] == 0.3  # the user's file wins where lmforge does not own the key
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=8 \(lmforge: 4\)"):
        build_ds_config(load_config(None, [*base, "deepspeed.micro_batch_size=4"]), world_size=2)
    with pytest.raises(ConfigError, match="offload_params=true needs deepspeed.zero_stage=3"):
        load_config(None, [*base, "deepspeed.zero_stage=2"])


def test_schedules_warm_up_then_follow_their_shape():
    import torch

    from pretrain.engine import build_scheduler

    def lrs(schedule):
        cfg = load_config(None, ["data.path=d", "data.tokenizer=t", f"optim.schedule={schedule}", "optim.lr=1.0",
                                 "optim.warmup_steps=10", "max_steps=100", "optim.min_lr_ratio=0.1"])
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler(opt, cfg)
        out = []
        for _ in range(100):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    for name in ("cosine", "linear", "constant", "wsd"):
        lr = lrs(name)
        assert lr[0] == (0.1 if name == "wsd" else 0.0) and abs(lr[10] - 1.0) < 1e-9, name  # wsd warms up from min
    assert abs(lrs("cosine")[-1] - 0.1) < 0.01 and lrs("linear")[-1] < 0.02 and lrs("constant")[-1] == 1.0
    wsd = lrs("wsd")
    assert wsd[79] == 1.0 and wsd[-1] < 0.15  # stable until the last 20%, then decays to about min_lr_ratio


def test_wandb_needs_wandb_installed():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="wandb_project='proj' but wandb is not installed"):
        load_config(None, ["data.path=d", "data.tokenizer=t", "wandb_project=proj"])


def test_each_bad_value_is_reported_once_under_its_own_key_lists_included():
    """A list with two bad items names each item once and nothing else about the list (indices do not shift)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.tokenizer=t", "optim.lrr=1", "deepspeed.zero_stage=5", "model.preset=llama-huge",
                           "optim.betas=[a, b]", "data.blend=[{path: a, weight: x}, {path: b, weight: y}]",
                           "debug.crash_in_save=nope"])
    problems = str(err.value).removeprefix("invalid config: ").split("; ")
    keys = [p.split("=")[0].split(":")[0] for p in problems]
    assert sorted(keys) == sorted(["optim.lrr", "deepspeed.zero_stage", "model.preset", "optim.betas[0]", "optim.betas[1]",
                                   "data.blend[0].weight", "data.blend[1].weight", "debug.crash_in_save"]), problems
    assert "optim.betas[0]='a': Input should be a valid number" in problems[keys.index("optim.betas[0]")]
    assert "optim.betas[1]='b': Input should be a valid number" in problems[keys.index("optim.betas[1]")]
    assert "'before_rename'" in problems[keys.index("debug.crash_in_save")]
    assert "model.preset='llama-huge' (allowed: bert-base," in problems[keys.index("model.preset")]
