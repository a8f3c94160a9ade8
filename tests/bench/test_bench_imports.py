"""Every lmforge name the bench scripts import (at top level or inside functions) exists.

The benches run only under ``make bench``, not in CI, so a refactor that moves a function would
otherwise break them silently (it did once: ``causal_lm_inputs`` moved from pretrain.data to
pretrain.inputs).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
OWN_PACKAGES = ("data_prep", "pretrain", "launch", "lmforge")


def _own_imports():
    for script in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OWN_PACKAGES:
                for alias in node.names:
                    yield script.name, node.module, alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in OWN_PACKAGES:
                        yield script.name, alias.name, None


def test_bench_scripts_import_only_names_that_exist():
    imports = list(_own_imports())
    assert len(imports) > 10  # the scan found the benches' imports
    missing = []
    for script, module, name in imports:
        mod = importlib.import_module(module)
        if name is not None and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script}: from {module} import {name}")
    assert not missing, missing
