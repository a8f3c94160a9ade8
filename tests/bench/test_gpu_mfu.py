"""The GPU MFU benchmark's mechanics, dry-run on CPU: CI has no GPU, so this is what keeps the script honest.

``bench/gpu_mfu.py`` trains with the real trainer, stops it with ``debug.kill_at_step`` (no checkpoint
written), and reads MFU, tokens/s and peak memory from ``metrics.jsonl``; here with ``llama-test`` and a
made-up peak of 1 TFLOP/s, so the trainer reports an MFU on CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_measure_reads_the_trainers_mfu_and_skips_warmup(tmp_path, tokenizer_dir, prepared_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("common", None)
    import gpu_mfu

    got = gpu_mfu.measure(tokenizer_dir, prepared_dir, tmp_path / "run", zero_stage=2, checkpointing=True,
                          micro_batch=4, steps=10, warmup_steps=4, peak_tflops=1.0, preset="llama-test",
                          accelerator="cpu")
    assert "error" not in got, got.get("output_tail")
    assert got["windows"] == 2  # logged at steps 5 and 10; step 5 > warmup 4
    assert 0 < got["mfu_pct"] < 100 and got["tokens_per_s"] > 0 and got["peak_mem_gib"] > 0
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())

    bad = gpu_mfu.measure(tokenizer_dir, prepared_dir, tmp_path / "nopeak" / "run", zero_stage=0, checkpointing=False,
                          micro_batch=4, steps=6, warmup_steps=0, peak_tflops=0.0, preset="llama-test",
                          accelerator="cpu")
    assert bad["error"] == "the trainer knows no peak for this GPU: pass --peak-tflops"
