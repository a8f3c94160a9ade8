"""compile on CPU: tokens/s of ``compile=true`` (torch.compile through DeepSpeed's engine.compile(), inductor)
against eager, on one rank.

The demo config (``pretrain/configs/demo.yaml``: llama-tiny, micro batch 8) in fp32 (this CPU emulates bf16)
on the bench corpus (``common.bench_data``: 256-token sequences), one rank with all cores, ``--steps`` steps
logged every 2; steady state after step ``SKIP_STEPS`` (the compiled run's first step includes compilation).
The two sides alternate for ``--repeats`` rounds. Also records each run's wall time (the compiled runs' includes
compiling the training and the validation graphs).

Usage: ``python bench/bench_compile.py [--repeats 2] [--steps 16]``; writes ``bench/results/bench_compile.json``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import common

SKIP_STEPS = 4
OVERRIDES = ["deepspeed.precision=fp32"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args(argv)
    tok, data = common.bench_data()
    wall_s: dict[str, list[float]] = {"eager": [], "compiled": []}
    with tempfile.TemporaryDirectory(prefix="lmf-bench-compile-") as tmp:
        counter = iter(range(10**6))

        def side(compile_on: bool):
            def measure() -> float:
                run_dir = Path(tmp) / f"run{next(counter)}"
                out = common.lmforge_train(tok, data, run_dir, 1, args.steps, [*OVERRIDES, f"compile={str(compile_on).lower()}"],
                                           skip_steps=SKIP_STEPS)
                wall_s["compiled" if compile_on else "eager"].append(out["wall_s"])
                return out["tokens_per_s"]
            return measure

        common.MIN_REPEATS = min(common.MIN_REPEATS, args.repeats)
        runs = common.alternate({"eager": side(False), "compiled": side(True)}, args.repeats)
    rows = [common.row("training throughput, 1 CPU rank, llama-tiny fp32, micro batch 8 x 256 tokens", "tokens/s",
                       runs["compiled"], runs["eager"], peer_name="the same run eager (compile=false)",
                       note=f"lmforge side: compile=true; steady state after step {SKIP_STEPS} of {args.steps}")]
    common.print_rows(rows)
    common.write_result("bench_compile", "compile on CPU", rows,
                        {"overrides": OVERRIDES, "steps": args.steps, "skip_steps": SKIP_STEPS, "runs": runs,
                         "wall_s": wall_s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
