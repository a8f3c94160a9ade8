"""docs/config.md is generated from pretrain/config.py's field docstrings and must not fall behind it."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from pretrain.config import TrainConfig

GENERATOR = Path(__file__).resolve().parents[2] / "docs" / "gen_config_reference.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_committed_config_reference_is_up_to_date_and_lists_every_key():
    gen = _generator()
    text = gen.render()
    assert gen.OUTPUT.read_text(encoding="utf-8") == text, "docs/config.md is stale: run python docs/gen_config_reference.py"
    listed = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `")}
    assert listed == set(_keys(TrainConfig()))
    assert "| `deepspeed.zero_stage` | `0 \\| 1 \\| 2 \\| 3` | `2` | ZeRO stage:" in text
