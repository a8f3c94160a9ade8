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
    for part in ("deepspeed.zero_stage=5 (allowed: 0, 1, 2, 3)", "deepspeed.precision='fp8' (allowed: fp32, bf16, fp16)",
                 "optim.schedule='step'", "max_steps=0 (allowed: >= 1)"):
        assert part in msg
    assert "\n" not in msg


def test_unknown_key_wrong_type_and_missing_data_are_named(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.zero_stag"):
        load_config(None, ["deepspeed.zero_stag=2"])
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, ["max_steps=many"])
    with pytest.raises(ConfigError, match="data.path is required; data.tokenizer is required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
