"""bench/report.py renders every result file it finds, the memory plan section and the compile rounds included
(BENCHMARKS.md is regenerated from them: a section it skipped would be deleted)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_committed_result_file_is_rendered():
    report = _report()
    results = BENCH / "results"
    text = report.render(results)
    top, plans = report.load_results(results)
    assert top and plans
    for name in top:
        assert f"`bench/results/{name}.json`" in text, name
    for name in plans:
        assert f"`{name}`" in text, name  # a table row, a refusal line or an earlier measurement
    assert "## Memory plan" in text and "## compile on CPU" in text
    assert "| bench_compile |" not in text  # no bare median ratio in the Targets table either


def _plan_result(preset: str, stage: int, nproc: int, peak: int, n_params: int, plan: int, **extra) -> dict:
    return {"preset": preset, "zero_stage": stage, "nproc": nproc, "max_steps": 3, "overrides": ["deepspeed.precision=fp32"],
            "exit_code": 0, "peak_rss_bytes": {str(r): peak for r in range(nproc)}, "max_peak_rss_bytes": peak,
            "plan": {"n_params": n_params, "per_rank_bytes": plan, "available_bytes": 2**34, "fits": True}, **extra}


def test_memory_plan_section_checks_the_zero3_bound_against_b_of_the_same_launch(tmp_path):
    report = _report()
    folder = tmp_path / "memory_plan"
    folder.mkdir()
    n = 312_500_000
    b = 600_000_000
    bound = b + 1.5 * 16 * n / 4
    files = {"b": _plan_result("llama-test", 3, 4, b, 361_280, 650_000_000),
             "met": _plan_result("llama-350m", 3, 4, int(bound) - 1, n, int(bound)),
             "b-bf16": {**_plan_result("llama-test", 3, 2, b, 361_280, b), "overrides": []},
             "unpaired": _plan_result("llama-350m", 3, 2, 5 * 2**30, n, 5 * 2**30),
             "old": _plan_result("llama-350m", 3, 4, 5 * 2**30, n, 0, note="Before the fix."),
             "refused": {**_plan_result("llama-7b", 3, 2, 0, 7 * 10**9, 60 * 2**30), "exit_code": 2, "wall_s": 7.4,
                         "plan": {"n_params": 7 * 10**9, "per_rank_bytes": 60 * 2**30, "available_bytes": 8 * 2**30,
                                  "fits": False}}}
    for name, result in files.items():
        (folder / f"{name}.json").write_text(json.dumps(result))
    text = report.render(tmp_path)
    lines = text.splitlines()
    bound_line = next(line for line in lines if "ZeRO-3 bound" in line and "`met`" in line)
    assert f"{bound:,.0f} bytes" in bound_line and "**met**" in bound_line and "(`b`)" in bound_line
    assert any("not checked" in line and "unpaired" in line for line in lines)  # b-bf16: other overrides, 2 ranks
    assert any(line.startswith("- `refused`: llama-7b") and "exited 2 after 7.4 s" in line and "refused up front" in line
               for line in lines)
    assert any("`old`" in line and "Before the fix." in line for line in lines)
    assert sum(1 for line in lines if line.startswith("| llama-")) == 4  # b, b-bf16, met, unpaired; not old, refused
    over = _plan_result("llama-350m", 3, 4, int(bound) + 10**8, n, int(bound))
    (folder / "met.json").write_text(json.dumps(over))
    assert "**not met**" in report.render(tmp_path)


def test_compile_rounds_that_disagree_get_a_caveat_not_a_ratio(tmp_path):
    report = _report()
    busy = json.loads((BENCH / "results" / "bench_compile.json").read_text())  # the real file's shape, a busy machine's rounds
    busy["details"]["runs"] = {"eager": [97.0509, 269.947], "compiled": [207.4107, 2073.1995]}
    busy["machine"]["load_average_1_5_15_min"] = [4.25, 11.43, 15.27]
    (tmp_path / "bench_compile.json").write_text(json.dumps(busy))
    section = report.render(tmp_path).split("## compile on CPU", 1)[1]
    assert "| 1 | 97.1 | 207 | 2.14x |" in section and "| 2 | 270 | 2,073 | 7.68x |" in section
    assert "do not give a reliable ratio" in section
    steady = busy
    steady["details"]["runs"] = {"eager": [100.0, 110.0], "compiled": [200.0, 215.0]}
    steady["machine"]["load_average_1_5_15_min"] = [0.5, 0.5, 0.5]
    (tmp_path / "bench_compile.json").write_text(json.dumps(steady))
    assert "Compiled / eager tokens/s: 2.00x, 1.95x" in report.render(tmp_path)


def test_a_ratio_whose_rounds_fall_on_both_sides_of_one_is_a_tie():
    report = _report()
    import common  # bench/common.py, put on the path by report.py

    win = common.row("throughput", "tokens/s", [110.0, 120.0, 130.0], [100.0, 100.0, 100.0], "peer", target=">= 1.0x")
    assert win["ratio_range"] == [1.1, 1.3] and report.fmt_ratio(win) == "1.20x [1.10-1.30]"
    assert report.target_met(win) == "yes"
    tie = common.row("wall", "s", [10.0, 12.0, 9.0], [11.0, 11.0, 11.0], "peer", better="lower", target=">= 1.0x")
    assert report.fmt_ratio(tie) == "tie (1.10x, rounds 0.92-1.22x)" and report.target_met(tie) == "**no** (tie)"
    parity = {**tie, "target": ">= 0.95x"}  # a parity target is met by a tie
    assert report.target_met(parity) == "yes"
    old = {k: v for k, v in tie.items() if k != "ratio_range"}  # results written before rows carried the range
    assert report.fmt_ratio(old) == report.fmt_ratio(tie)
    assert report.target_met({"target": "< 0.5 s", "lmforge": 0.34, "peer": None}) == "yes"
    assert report.target_met({"target": "< 0.5 s", "lmforge": 0.5, "peer": None}) == "**no**"


def test_gpu_mfu_rows_with_the_trainer_peer_render_and_the_placeholder_goes(tmp_path):
    report = _report()
    import common

    assert "## MFU on one GPU: lmforge vs HF Trainer" in report.render(tmp_path)  # nothing measured: the placeholder
    row = common.row("MFU, llama-1b bf16 seq 2048, ZeRO 2, sdpa, compile off, no activation checkpointing", "%", 52.0, 44.0,
                     "HF Trainer + DeepSpeed + Liger", target=">= 50%", note="NVIDIA H100 80GB HBM3. Both: micro batch 8")
    result = {"name": "gpu_mfu_quick", "title": "MFU on one GPU (NVIDIA H100 80GB HBM3): lmforge vs HF Trainer + DeepSpeed "
              "+ Liger (--quick)", "machine": {"gpu": "NVIDIA H100 80GB HBM3"}, "rows": [row], "details": {}}
    (tmp_path / "gpu_mfu_quick.json").write_text(json.dumps(result))
    text = report.render(tmp_path)
    assert "## MFU on one GPU: lmforge vs HF Trainer" not in text
    assert "Produced by hand, on a machine with a CUDA GPU: `python bench/gpu_mfu.py --quick`" in text
    assert ("| MFU, llama-1b bf16 seq 2048, ZeRO 2, sdpa, compile off, no activation checkpointing | % | 52 | "
            "44 (HF Trainer + DeepSpeed + Liger) | 1.18x | >= 50% | yes | NVIDIA H100 80GB HBM3. Both: micro batch 8 |") in text
    assert "| gpu_mfu_quick | MFU, llama-1b" in text and "1 x NVIDIA H100 80GB HBM3" in text


def test_results_record_the_commit_they_were_measured_at_and_the_report_shows_it(tmp_path, monkeypatch):
    """A result written from a git checkout carries its HEAD (``+uncommitted`` over local edits); the report
    prints it next to the date, and results written before the field existed render without one."""
    import re
    import subprocess

    report = _report()
    import common

    git = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                         text=True)
    if git.returncode:  # a tree without .git: nothing to record
        assert common.source_commit() is None
    else:
        assert re.fullmatch(rf"{git.stdout.strip()}(\+uncommitted)?", common.source_commit() or "")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    written = json.loads(common.write_result("bench_x", "X", [], {}).read_text())
    assert written["commit"] == common.source_commit()
    assert f"at lmforge commit {written['commit']} on " in report.provenance(written)
    assert " at lmforge commit" not in report.provenance({k: v for k, v in written.items() if k != "commit"})
