"""model.overrides on configs with derived per-layer lists (layer_types), refused in preflight when invalid."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.errors import ConfigError
from pretrain.model import build_model, build_model_config

SPECIAL = {"pad_token_id": 0}
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "pretrain" / "configs" / "demo.yaml"


@pytest.mark.parametrize("preset, overrides", [
    ("modernbert-base", {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4}),
    ("qwen3-test", {"num_hidden_layers": 5}),
])
def test_depth_override_derives_layer_types_again_and_the_model_runs(preset, overrides):
    config = build_model_config(preset, 128, 32, SPECIAL, overrides)
    assert config.num_hidden_layers == len(config.layer_types) == overrides["num_hidden_layers"]
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(1, 128, (1, 16))).logits
    assert logits.shape == (1, 16, 128) and torch.isfinite(logits).all()


def test_explicit_layer_types_are_kept_and_a_bad_combination_is_one_line():
    config = build_model_config("qwen3-test", 128, 32, SPECIAL,
                                {"num_hidden_layers": 3, "layer_types": ["full_attention"] * 3})
    assert config.layer_types == ["full_attention"] * 3
    with pytest.raises(ConfigError, match=r"invalid for ModernBertConfig: .*num_hidden_layers.* \(4\) .* \(3\)") as err:
        build_model_config("modernbert-base", 128, 32, SPECIAL, {"num_hidden_layers": 4, "layer_types": ["full_attention"] * 3})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.overrides.nope: not a field of Qwen3Config"):
        build_model_config("qwen3-test", 128, 32, SPECIAL, {"nope": 1})


def test_launcher_preflight_refuses_an_invalid_override_before_any_rank(tmp_path, prepared_dir, tokenizer_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "launch", "local", "--nproc", "2", str(DEMO_CONFIG),
                           f"data.path={prepared_dir}", f"data.tokenizer={tokenizer_dir}", f"run_dir={run_dir}",
                           "model.preset=llama-test", "model.overrides.hidden_size=65"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hidden size (65) is not a multiple of the number of attention heads (4)" in proc.stderr
    assert not run_dir.exists()  # no rank started
