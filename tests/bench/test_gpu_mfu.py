"""The GPU MFU benchmark's mechanics, dry-run on CPU: CI has no GPU, so this is what keeps the script honest.

``bench/gpu_mfu.py`` trains lmforge with the real trainer, stopped with ``debug.kill_at_step`` (no checkpoint
written), and the HF Trainer + DeepSpeed peer (``bench/train_peers.py trainer``, one rank) on the same resolved config
file, and turns both sides' steady tokens/s into MFU with the same FLOPs per token and peak; here with
``llama-test``, DeepSpeed's CPU accelerator and a made-up peak of 1 TFLOP/s. Two spawned trainings, about 30 s.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def gpu_mfu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("common", "train_peers", "gpu_mfu"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import gpu_mfu

    return gpu_mfu


def test_one_configuration_gives_lmforge_and_the_trainer_peer_mfu_on_cpu(tmp_path, tokenizer_dir, prepared_dir, gpu_mfu):
    opts = gpu_mfu.Options(steps=10, warmup_steps=5, micro_batch_size=4, peak_tflops=1.0, liger_why="off (CPU dry run)",
                           accelerator="cpu")
    config = gpu_mfu.Config("llama-test", 2, checkpointing=True)
    got = gpu_mfu.measure_config(config, tokenizer_dir, prepared_dir, tmp_path / config.slug, opts)
    (lm,), (peer,) = got["lmforge"], got["peer"]
    assert "error" not in lm, lm.get("output_tail")
    assert "error" not in peer, peer.get("output_tail")
    assert got["micro_batch_size"] == 4 and lm["windows"] == 1  # logged at steps 5 and 10; the window to step 10 counts
    assert lm["tokens_per_s"] > 0 and 0 < lm["logged_mfu_pct"] < 100 and lm["peak_mem_gib"] > 0
    assert peer["tokens_per_s"] > 0 and peer["engine"] == "DeepSpeedEngine" and peer["liger_modules"] == 0
    assert peer["skip_steps"] == 5 and peer["steps"] == 11  # the same config file: steps + 1, warm-up left out
    run = tmp_path / config.slug / "mb4" / "run0"
    assert (run / "metrics.jsonl").is_file()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())  # killed before the final save

    row = gpu_mfu.config_row(config, got, opts, "cpu")
    assert row is not None and row["peer_name"] == "HF Trainer + DeepSpeed" and row["better"] == "higher"
    assert row["lmforge"] == pytest.approx(gpu_mfu.mfu_pct(lm["tokens_per_s"], got["flops_per_token"], 1.0))
    assert 0 < row["lmforge"] < 100 and 0 < row["peer"] < 100 and row["ratio"] > 0
    assert row["target"] == "" and row["runs"] == {"lmforge": [row["lmforge"]], "peer": [row["peer"]]}
    for setting in ("micro batch 4", "grad accumulation 1", "attention sdpa", "ZeRO 2", "compile off",
                    "activation checkpointing on", "adamw_torch_fused", "Liger off (CPU dry run)", "one run per side"):
        assert setting in row["note"], setting

    failed = {**got, "peer": [{"error": "out of memory", "output_tail": ""}]}
    lone = gpu_mfu.config_row(gpu_mfu.Config("llama-1b", 2), failed, opts, "cpu")
    assert lone["peer"] is None and lone["ratio"] is None and "peer failed: out of memory" in lone["note"]
    assert lone["target"] == ">= 50%"


def test_quick_default_and_full_select_their_configurations(gpu_mfu):
    config = gpu_mfu.Config
    assert gpu_mfu.select_configs("quick") == [config("llama-1b", 2, "sdpa", compile=False, checkpointing=False)]
    default = gpu_mfu.select_configs("default")
    assert default == [config("llama-1b", 0), config("llama-1b", 0, checkpointing=True),
                       config("llama-1b", 2), config("llama-1b", 2, checkpointing=True)]
    full = gpu_mfu.select_configs("full")
    attentions = {"sdpa", "flash_attention_2", "flex_attention", "eager"}
    assert len(full) == len(set(full)) == 3 * 2 * len(attentions) * 2 + 2
    assert {c.preset for c in full} == {"llama-125m", "llama-350m", "llama-1b"}
    assert {c.zero_stage for c in full} == {0, 2} and {c.attention for c in full} == attentions
    assert {c.compile for c in full} == {False, True} and set(default) <= set(full)
    assert [c for c in full if c.checkpointing] == [c for c in default if c.checkpointing]
    with pytest.raises(ValueError):
        gpu_mfu.select_configs("huge")

    keep, skipped = gpu_mfu.runnable(full, device="cpu")
    assert {c.attention for c in keep} <= {"sdpa", "eager"} and len(keep) + len(skipped) == len(full)
    assert all("flex_attention" in why or "flash" in why for why in skipped.values())
    assert gpu_mfu.liger_choice("auto", "cpu")[0] is False and gpu_mfu.liger_choice("off")[1] == "off (--liger off)"


def test_a_machine_without_a_gpu_skips_with_exit_0(gpu_mfu, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_mfu.main(["--quick"]) == 0
    assert "gpu_mfu: skipped: no CUDA GPU visible" in capsys.readouterr().out
