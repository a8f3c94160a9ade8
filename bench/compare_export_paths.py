"""How lmforge reads DeepSpeed checkpoints for the export: its own torch.save parser against torch's loader.

One-off measurement behind keeping ``pretrain/export/torch_archive.py`` (issue 13 section 4: the library path
replaces the parser unless a measured export of a checkpoint of at least 1B parameters is more than 1.2x slower):

- ``parser`` (this checkout): ``torch_archive.load_structure`` reads each file's pickle and storage offsets
  without importing torch or DeepSpeed; tensors are copied with ``os.copy_file_range``.
- ``torch.load`` (``--library-checkout``, a worktree at commit b1ac10a): ``torch.load(mmap=True,
  weights_only=True)`` with DeepSpeed's pickled classes allow-listed; the same kernel copy, from offsets located
  through ``/proc/self/maps``.

The checkpoint (built once into ``--work``, about 8 GB on disk) is hand-made in DeepSpeed's ZeRO-3 layout for 2
ranks (``pretrain/export/consolidate.py``) inside a copy of ``bench_export.py``'s llama-350m run (which must
exist: run ``bench_export.py`` first), its 24 decoder layers repeated to ``--layers`` (80: 1.03B parameters,
4.1 GB fp32), weights zero (only bytes are timed; no Adam moments). Each side runs ``lmforge export TAG OUT
--no-verify`` in a fresh process, alternating (``common.alternate``), start-up and imports included, page cache
warm; wall time and peak RSS (``ru_maxrss``) are recorded and both ``model.safetensors`` compared byte for byte.

Usage: ``python bench/compare_export_paths.py --library-checkout DIR [--layers 80] [--repeats 5]``; writes
``bench/results/compare_export_paths.json``.
"""
from __future__ import annotations

import argparse
import filecmp
import functools
import json
import math
import os
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import common

STEP = "step_00000001"


def build_checkpoint(src_run: Path, dst_run: Path, layers: int) -> tuple[Path, int]:
    """The hand-built ZeRO-3 checkpoint in a copy of ``src_run``; returns its folder and parameter count.

    Built in a child process: a child's ``ru_maxrss`` starts from its parent's resident set at fork, so the
    timed exports must be started by a small parent."""
    tag = dst_run / "checkpoints" / STEP
    if not (tag / "lmforge_state.json").is_file():
        common.check_child(common.run_child([sys.executable, __file__, "--build", str(src_run), str(dst_run), str(layers)],
                                            env=common.python_env(**common.CPU_ONLY_ENV)), "building the checkpoint")
    return tag, json.loads((tag.parent.parent / "n_params.json").read_text())


def _build(src_run: Path, dst_run: Path, layers: int) -> None:
    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    src_tag, tag = src_run / "checkpoints" / STEP, dst_run / "checkpoints" / STEP
    ms = torch.load(src_tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shapes0 = OrderedDict((k, v) for group in ms["param_shapes"] for k, v in group.items())
    layer = OrderedDict((re.sub(r"^model\.layers\.0\.", "", k), v) for k, v in shapes0.items()
                        if k.startswith("model.layers.0."))
    head = [(k, v) for k, v in shapes0.items() if not k.startswith("model.layers.")]
    shapes = OrderedDict([head[0], *((f"model.layers.{i}.{k}", v) for i in range(layers) for k, v in layer.items()),
                          *head[1:]])
    n_params = sum(math.prod(v) for v in shapes.values())
    shutil.rmtree(dst_run, ignore_errors=True)
    shutil.copytree(src_run, dst_run, ignore=shutil.ignore_patterns("checkpoints", "rank*.log", "tensorboard"))
    tag.mkdir(parents=True)
    per_rank = sum(math.ceil(math.prod(v) / 2) for v in shapes.values())
    for r in range(2):
        torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "partition_count": 2,
                                             "fp32_flat_groups": [torch.zeros(per_rank)]}},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({**ms, "param_shapes": [shapes]}, tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    config = json.loads((dst_run / "model" / "config.json").read_text())
    (dst_run / "model" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
    (dst_run / "n_params.json").write_text(json.dumps(n_params))
    shutil.copy2(src_tag / "lmforge_state.json", tag / "lmforge_state.json")  # written last: the checkpoint is complete


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--build"]:
        _build(Path(argv[1]), Path(argv[2]), int(argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library-checkout", required=True, help="worktree of lmforge at the torch.load path (b1ac10a)")
    p.add_argument("--work", default=str(common.CACHE_DIR / "export"), help="bench_export.py's cache folder")
    p.add_argument("--layers", type=int, default=80, help="decoder layers of the hand-built checkpoint")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds (>= 3)")
    args = p.parse_args(argv)
    common.use_this_checkout()
    from bench_export import warm_page_cache

    work = Path(args.work)
    tag, n_params = build_checkpoint(work / "run-llama-350m", work / f"run-zero3-{args.layers}layers", args.layers)
    sides = {"parser": common.REPO_ROOT, "torch.load": Path(args.library_checkout).resolve()}
    outs = {side: work / f"out-{side}" for side in sides}
    rss: dict[str, list[int]] = {side: [] for side in sides}
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    warm_page_cache(tag)

    def run(side: str) -> float:
        shutil.rmtree(outs[side], ignore_errors=True)
        result = common.run_child(common.lmforge_cmd("export", str(tag), str(outs[side]), "--no-verify"),
                                  env={"PYTHONPATH": str(sides[side]), **common.CPU_ONLY_ENV}, cwd=sides[side])
        common.check_child(result, f"{side} export")
        rss[side].append(result.peak_rss_bytes)
        return result.wall_s

    try:
        wall = common.alternate({side: functools.partial(run, side) for side in sides}, args.repeats)
        same = filecmp.cmp(outs["parser"] / "model.safetensors", outs["torch.load"] / "model.safetensors", shallow=False)
    finally:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    what = f"{n_params / 1e9:.2f}B-parameter ZeRO-3 checkpoint ({n_params * 4 / 1e9:.1f} GB fp32, 2 ranks, hand-built)"
    peer = "torch.load(mmap=True, weights_only=True) path (b1ac10a)"
    slower = common.median(wall["torch.load"]) / common.median(wall["parser"])
    verdict = "torch.load path kept" if slower <= 1.2 else "parser kept"
    rows = [common.row(f"export time, {what}", "s", wall["parser"], wall["torch.load"], peer, better="lower",
                       note=f"torch.load path {slower:.2f}x the parser's time (rule: replace the parser unless > 1.2x): "
                            f"{verdict}; model.safetensors identical: {'yes' if same else 'NO'}; lmforge export "
                            "--no-verify, fresh process, start-up and imports included; page cache warm"),
            common.row("peak RSS of the export process", "GiB", [r / 2**30 for r in rss["parser"]],
                       [r / 2**30 for r in rss["torch.load"]], peer, better="lower", note="ru_maxrss")]
    common.print_rows(rows)
    common.write_result("compare_export_paths", "Export: lmforge's torch.save parser vs torch.load (kept: the parser)",
                        rows, {"checkpoint": str(tag), "n_params": n_params, "repeats": args.repeats,
                               "outputs_identical": same, "library_checkout": str(sides["torch.load"]),
                               "load_average_1_5_15_min_at_start": load_at_start, "peak_rss_bytes": rss})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
