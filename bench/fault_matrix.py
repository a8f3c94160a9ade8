"""Fault matrix: the 11 faults of issue 15, each survived or not, N times on real 2-rank runs (seeded draws).

Start-up dominates the cost of a run (imports, gloo rendezvous, engine set-up: tens of seconds on 2 busy
cores, against well under a second for the steps of llama-test), so each of the N runs is **one chain**:
one run folder takes every fault in turn, and each launch both resumes from the previous fault and
injects the next (as ``tests/faults/test_matrix.py`` does). Per run:

====  ==================================================  ==========================================================
 #    launch (or action between launches)                   fault
====  ==================================================  ==========================================================
 1    ``debug.inject_nan_at_steps=[a,a+1]``, K=2            2 non-finite steps in a row (``a`` odd, drawn)
 2    ``debug.kill_at_step``                                kill -9 at a random step
 3-5  ``debug.crash_in_save`` = each point in turn          kill -9 at each crash point of a save (all 3 every run)
 6    ``debug.sigterm_in_eval``                             SIGTERM inside an evaluation
 7    ``checkpoint.export_every_steps`` + SIGTERM           SIGTERM while a background export runs
 8    ``debug.write_error_in_save`` (points in turn)        a write error during a save (a real EFBIG)
 --   damage the 3 newest checkpoints                       truncated file / flipped byte / truncated state file
 9    ``debug.hang_at_step``                                rank 1 hangs
 10   ``data.verify_checksums`` on a rotted data copy        a corrupt shard (one byte flipped in every train shard)
 --   move the run folder, delete the tokenizer folder       moved run dir (then ``train MOVED/config.yaml``, no run_dir)
 11   ``guard.rollback=true`` + ``debug.spike_at_steps``    a loss spike with rollback on; runs to the end
====  ==================================================  ==========================================================

The launch after a fault **judges** it (the corrupt-shard launch writes nothing, so the launch after it judges
the hang too). References: one uninterrupted run (``REFERENCE``), and per rollback target step ``r`` one
uninterrupted run from step 0 that skips the same global batches after step ``r``
(``debug.skip_batches_after_step``), cached by ``r``.

What **survived** means per case (``SURVIVED`` below, also in the JSON): the fault happened as injected (exit
codes, log lines), and the judging launch resumed from the newest checkpoint that verifies and logged every
step's loss equal to the reference's, bit for bit. **Steps lost** counts the judging launch's steps whose loss
differs from the reference (or that it did not reach); **time to resume** is from the judging launch's start
(imports and set-up included) to its first new training step.

Usage: ``python bench/fault_matrix.py [--runs 10] [--seed 20261125]``; writes ``bench/results/fault_matrix.json``
(``bench/report.py`` renders it into BENCHMARKS.md) after every run, so an interrupted matrix records the N it
reached. ``--merge A.json B.json`` combines invocations run side by side with other seeds into one table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's packages (bench/ is on sys.path already)

from common import bench_data, check_child, lmforge_cmd, python_env, run_child, write_result  # noqa: E402
from fault_injection import damage, restore, rot_shards, wait_for  # noqa: E402
from fault_launch import NPROC, STEPS, Launch, Verdict, judge, launch, newest_verified  # noqa: E402

from lmforge_common import EXIT_PREEMPTED  # noqa: E402
from pretrain.checkpoint import CRASH_POINTS, WRITE_POINTS  # noqa: E402

ROLLBACK = ["guard.rollback=true", "guard.spike_patience=2", "guard.spike_window=3", "guard.skip_batches=3",
            "guard.max_rollbacks=1"]
SKIP_BATCHES = 3

CASES = ["kill -9 at a random step", "kill -9 at each crash point of a save",
         "corrupted newest checkpoints (truncated file, flipped byte, truncated state file)",
         "SIGTERM during an evaluation", "SIGTERM while a background export runs", "2 non-finite steps in a row",
         "a write error during a save", "a rank hangs", "a corrupt shard", "moved run dir, tokenizer folder deleted",
         "loss spike with rollback on"]
SURVIVED = {
    CASES[0]: "both ranks died by SIGKILL; the rerun resumed from the newest checkpoint and every step's loss "
              "equals the reference's, bit for bit",
    CASES[1]: "for each of the 3 crash points (after DeepSpeed's files, before the rename, before `latest`): rank 0 "
              "died by SIGKILL there, no partial folder was taken, and the rerun's losses equal the reference's",
    CASES[2]: "the 3 newest checkpoints were damaged (a file truncated to half, one byte flipped, the state file "
              "truncated); the rerun logged one 'fails verification' line for each, resumed from the 4th newest, "
              "and its losses equal the reference's",
    CASES[3]: "SIGTERM inside an evaluation forward: both ranks exited 75 after a save; the rerun's losses equal "
              "the reference's",
    CASES[4]: "SIGTERM while the background export of the previous checkpoint ran: both ranks exited 75; the export "
              "finished and verified on its own (model.safetensors written); the rerun's losses equal the reference's",
    CASES[5]: "NaN losses on 2 steps in a row starting after a save: both ranks stopped with exit 2 before saving a "
              "skipped step; the rerun's losses equal the reference's",
    CASES[6]: "one write of a save failed with a real EFBIG (points in turn: DeepSpeed's files, digest files, probe, "
              "state file): exit 2 with exactly one line naming the folder and the bytes needed, no traceback, no "
              "partial folder, the previous checkpoint verifies; the rerun's losses equal the reference's",
    CASES[7]: "rank 1 slept before a step: rank 0 ended after distributed.timeout_minutes with the line naming "
              "rank 1; the rerun's losses equal the reference's",
    CASES[8]: "a byte flipped in every train shard, data.verify_checksums=true: each rank stopped (non-zero) with "
              "exactly one line naming a shard, before any step; nothing written (no new checkpoint, no partial "
              "folder, no loss record); after the shard was restored the rerun's losses equal the reference's",
    CASES[9]: "the run folder moved and its original tokenizer folder deleted: `lmforge train MOVED/config.yaml` "
              "from another directory, without run_dir=, resumed in the moved folder (nothing created at the old "
              "path) and its losses equal the reference's",
    CASES[10]: "an injected spike on 2 steps: exactly one rollback to the newest checkpoint before it, 3 global "
               "batches skipped; the run ended (exit 0) and every step's final loss equals that of an uninterrupted "
               "run that skipped the same batches after the same step, bit for bit",
}


def fault_data() -> tuple[Path, Path]:
    """``(tokenizer, prepared data)``: three standard-library packages (as the tests use), a 512-token byte BPE,
    64-token sequences, 10% of the documents held out for validation; built once under ``bench/.cache``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [str(stdlib / n) for n in ("json", "email", "asyncio")]
    tok, _ = bench_data("faults", corpus, vocab_size=512, seq_len=64)
    data = tok.parent / "data-val10"
    if not (data / "manifest.json").is_file():
        check_child(run_child(lmforge_cmd("prep", "--input", *corpus, "--tokenizer", str(tok), "--output", str(data),
                                          "--seq-len", "64", "--val-fraction", "0.1", "--overwrite"), env=python_env()),
                    "lmforge prep")
    return tok, data


class References:
    """The uninterrupted reference run, and one per rollback target step (cached)."""

    def __init__(self, work: Path, config: Path):
        self.work, self.config = work, config
        self.main = self._run("reference", [])
        self.rollback: dict[int, dict[int, float]] = {}

    def _run(self, name: str, overrides: list[str]) -> dict[int, float]:
        ran = launch(self.config, self.work / name, overrides)
        assert ran.codes == [0] * NPROC, f"reference run failed: see {self.work / name}"
        got = ran.losses()
        assert sorted(got) == list(range(1, STEPS + 1)), f"reference {name} logged steps {sorted(got)}"
        return got

    def skipped_after(self, step: int) -> dict[int, float]:
        if step not in self.rollback:
            self.rollback[step] = self._run(f"reference-skip-after-{step}", [f"debug.start_skip_batches={SKIP_BATCHES}",
                                                                              f"debug.skip_batches_after_step={step}"])
        return self.rollback[step]


@dataclass
class Chain:
    """One run folder taking every fault in turn (see the module docstring): its config, references, the verdict
    per case and the seeded draws. Each ``*_phase`` function below launches its faults in order and judges the
    previous phase's last fault; the draws from ``rng`` come in the table's order, so a seed gives the same faults."""

    index: int
    home: Path
    own_tok: Path
    own_data: Path
    config: Path
    run: Path
    refs: References
    rng: random.Random
    v: dict[str, Verdict] = field(default_factory=lambda: {name: Verdict(False) for name in CASES})
    draws: dict = field(default_factory=dict)

    @property
    def ref(self) -> dict[int, float]:
        return self.refs.main

    def ckpt(self) -> int:
        return newest_verified(self.run)

    def launch(self, overrides: list[str]) -> Launch:
        return launch(self.config, self.run, overrides)

    def judge(self, case: int | Verdict, f: Launch, expected_from: int, until: int | None = None) -> None:
        judge(self.v[CASES[case]] if isinstance(case, int) else case, f, expected_from, self.ref, until)


def nonfinite_and_kill_phase(ch: Chain) -> None:
    """1. K=2 non-finite steps in a row, from an odd step (right after a save); 2. kill -9 at a random step."""
    a = ch.draws["nan_from"] = ch.rng.choice((3, 5, 7))
    f = ch.launch([f"debug.inject_nan_at_steps=[{a},{a + 1}]", "guard.max_consecutive_nonfinite=2"])
    nan = ch.v[CASES[5]]
    nan.fault_ok = f.codes == [2, 2] and ch.ckpt() == a - 1
    if not nan.fault_ok:
        nan.notes.append(f"exit {f.codes}, newest {ch.ckpt()}")
    c = ch.ckpt()
    k = ch.draws["kill_at"] = c + ch.rng.randint(2, 4)  # the kill comes before step k is logged: one step at least is
    f = ch.launch([f"debug.kill_at_step={k}"])
    ch.judge(5, f, c)
    ch.v[CASES[0]].fault_ok = f.codes == [-9, -9]


def crash_and_eval_phase(ch: Chain) -> None:
    """3-5. kill -9 at each crash point of the next save; 6. SIGTERM inside the evaluation after the next even step."""
    crash = ch.v[CASES[1]]
    crash.fault_ok, crash.judged, resumes = True, True, []
    previous, prev_from = ch.v[CASES[0]], ch.ckpt()
    for point in CRASH_POINTS[1:]:
        c = ch.ckpt()
        f = ch.launch([f"debug.crash_in_save={point}"])
        part = Verdict(True)
        ch.judge(part, f, c)
        if previous is not crash:
            ch.judge(previous, f, prev_from)
        else:
            crash.steps_lost += part.steps_lost
            crash.notes += part.notes
            resumes.append(part.resume_s)
        if f.codes[0] != -9 or list(ch.run.glob("checkpoints/step_*/digests-rank*")):
            crash.fault_ok = False
            crash.notes.append(f"{point}: exit {f.codes}")
        previous, prev_from = crash, ch.ckpt()
    c = ch.ckpt()
    e = ch.draws["sigterm_eval_at"] = c + 2 - c % 2
    f = ch.launch([f"debug.sigterm_at_step={e}", "debug.sigterm_in_eval=true"])
    part = Verdict(True)
    ch.judge(part, f, c)
    crash.steps_lost += part.steps_lost
    crash.notes += part.notes
    crash.resume_s = max([*resumes, part.resume_s])
    ch.v[CASES[3]].fault_ok = f.codes == [EXIT_PREEMPTED] * NPROC and ch.ckpt() in (e, e + 1)


def export_and_write_error_phase(ch: Chain) -> None:
    """7. SIGTERM while the background export of the next even step's checkpoint runs; 8. a write error in the
    save of the next even step (the write points in turn over the runs); then the export must have finished."""
    c = ch.ckpt()
    x = c + 2 - c % 2
    f = ch.launch(["checkpoint.export_every_steps=2", f"debug.sigterm_at_step={x + 1}"])
    ch.judge(3, f, c)
    export = ch.run / "hf" / f"step_{x:08d}"
    ch.v[CASES[4]].fault_ok = f.codes == [EXIT_PREEMPTED] * NPROC
    ch.draws["export_of"] = x
    c = ch.ckpt()
    w = c + 2 - c % 2
    point = ch.draws["write_error"] = WRITE_POINTS[1:][ch.index % (len(WRITE_POINTS) - 1)]
    f = ch.launch([f"debug.write_error_in_save={point}", f"debug.write_error_at_step={w}"])
    ch.judge(4, f, c)
    lines = [line for line in f.log0.splitlines() if "could not write the checkpoint" in line]
    we = ch.v[CASES[6]]
    we.fault_ok = (f.codes == [2, 2] and len(lines) == 1 and "it needs about" in lines[0] and "Traceback" not in f.log0
                   and not list(ch.run.glob("checkpoints/.tmp-*")) and ch.ckpt() == c)
    if not we.fault_ok:
        we.notes.append(f"exit {f.codes}, {len(lines)} lines, newest {ch.ckpt()} (was {c})")
    if not wait_for(export / "model.safetensors"):
        ch.v[CASES[4]].notes.append("background export did not finish")


def damage_and_hang_phase(ch: Chain) -> None:
    """Damage the 3 newest checkpoints; 9. rank 1 hangs 2-3 steps after the checkpoint the resume falls back to."""
    damaged = ch.draws["damaged"] = damage(ch.run, ch.rng)
    c = ch.ckpt()
    h = ch.draws["hang_at"] = c + ch.rng.randint(2, 3)
    f = ch.launch([f"debug.hang_at_step={h}"])
    ch.judge(6, f, c)
    dmg = ch.v[CASES[2]]
    dmg.fault_ok = True
    ch.judge(dmg, f, c)
    fails = [line for line in f.log0.splitlines() if "fails verification" in line]
    if len(fails) != len(damaged) or any(f"step_{s:08d}" not in line for (s, _), line in zip(damaged, fails)):
        dmg.notes.append(f"{len(fails)} 'fails verification' lines for {len(damaged)} damaged checkpoints")
    ch.v[CASES[7]].fault_ok = (f.codes[0] == 2 and f"step {h}: a collective waited" in f.log0
                               and "not arrived: rank 1" in f.log0)


def corrupt_shard_phase(ch: Chain) -> int:
    """10. a corrupt shard: the launch stops at the first read, naming it, writing nothing (so it judges nothing:
    the next phase judges the hang too). Returns the newest verified checkpoint, where the next launch resumes."""
    c = ch.ckpt()
    before = sorted(p.name for p in (ch.run / "checkpoints").iterdir())
    saved = rot_shards(ch.own_data, ch.rng)
    try:
        f = ch.launch(["data.verify_checksums=true"])
    finally:
        restore(saved)
    shard = ch.v[CASES[8]]
    named = [[line for line in log.splitlines() if "shard sha256" in line] for log in (f.log0, f.log1)]
    shard.fault_ok = (all(code not in (0, -9) for code in f.codes) and all(len(n) == 1 for n in named)
                      and all(any(str(p) in n[0] for p in saved) for n in named)
                      and sorted(p.name for p in (ch.run / "checkpoints").iterdir()) == before
                      and not any("loss" in r for r in f.records))
    if not shard.fault_ok:
        shard.notes.append(f"exit {f.codes}, shard lines per rank {[len(n) for n in named]}")
    return c


def move_and_rollback_phase(ch: Chain, c: int) -> None:
    """Move the run folder and delete the tokenizer folder; 11. resume it by its own config.yaml from another
    directory, with a loss spike and rollback on, to the end; judges the hang, the shard and the move too."""
    moved = ch.home / "moved" / "run"
    moved.parent.mkdir()
    shutil.move(str(ch.run), str(moved))
    shutil.rmtree(ch.own_tok)
    elsewhere = ch.home / "elsewhere"
    elsewhere.mkdir()
    s = ch.draws["spike_at"] = c + 4 + ch.rng.randint(0, 1)
    f = launch(moved / "config.yaml", moved, [*ROLLBACK, f"debug.spike_at_steps=[{s},{s + 1}]"], cwd=elsewhere,
               with_run_dir=False, base=False)
    ch.v[CASES[9]].fault_ok = not ch.run.exists() and not (elsewhere / "runs").exists()
    for case in (7, 8, 9):
        ch.judge(case, f, c, until=s)
    rb = ch.v[CASES[10]]
    marks = [r for r in f.records if "rollback_to_step" in r]
    rb.fault_ok = f.codes == [0, 0] and len(marks) == 1
    rb.judged, rb.resume_s = True, f.resume_s
    if not rb.fault_ok:
        rb.notes.append(f"exit {f.codes}, {len(marks)} rollbacks")
        return
    r = ch.draws["rolled_back_to"] = marks[0]["rollback_to_step"]
    final = {}
    for line in (moved / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            final[rec["step"]] = rec["loss"]
    expected = ch.refs.skipped_after(r)
    rb.steps_lost = sum(final.get(step) != loss for step, loss in expected.items())
    summary = json.loads((moved / "summary.json").read_text())
    if (summary["rollbacks"], summary["skipped_samples"]) != (1, SKIP_BATCHES * 2 * NPROC):
        rb.notes.append(f"summary {summary['rollbacks']} rollbacks, {summary['skipped_samples']} skipped")


def one_chain(index: int, work: Path, tok: Path, data: Path, refs: References, rng: random.Random) -> dict:
    """Every fault, in turn, on one run folder (see the module docstring); ``{case: verdict dict}`` plus the draws."""
    t_start = time.monotonic()
    home = work / f"run{index}"
    own_tok, own_data = home / "tok", home / "data"
    shutil.copytree(tok, own_tok)
    shutil.copytree(data, own_data)
    config = home / "train.yaml"
    config.write_text(f"data:\n  path: {own_data}\n  tokenizer: {own_tok}\nmax_steps: {STEPS}\n")
    ch = Chain(index, home, own_tok, own_data, config, home / "run", refs, rng)
    nonfinite_and_kill_phase(ch)
    crash_and_eval_phase(ch)
    export_and_write_error_phase(ch)
    damage_and_hang_phase(ch)
    move_and_rollback_phase(ch, corrupt_shard_phase(ch))
    out = {name: {"survived": x.survived, "steps_lost": x.steps_lost, "time_to_resume_s": round(x.resume_s, 2),
                  "notes": x.notes} for name, x in ch.v.items()}
    return {"cases": out, "draws": ch.draws, "wall_s": round(time.monotonic() - t_start, 1), "dir": str(home)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs (chains) per case")
    parser.add_argument("--seed", type=int, default=20261125, help="seed of the fault points")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: remove each run's when it survived)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="instead of running: merge the results of separate invocations (other seeds, run side "
                             "by side) into one table; each keeps its seed, draws and reference runs")
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.loads(path.read_text())["details"] for path in args.merge]
        chains = [dict(chain, seed=chain.get("seed", part["seed"])) for part in parts for chain in part["runs"]]
        listed = lambda key: [v for part in parts for v in (part[key] if isinstance(part[key], list) else [part[key]])]  # noqa: E731
        write(chains, listed("seed"), sum(part["reference_runs"] for part in parts),
              max(part["wall_s"] for part in parts), listed("work_dir"),
              sum(part.get("runs_asked", part["runs_per_case"]) for part in parts))
        return 0 if all(c["survived"] for chain in chains for c in chain["cases"].values()) else 1
    tok, data = fault_data()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fault_matrix-"))
    config = work / "train.yaml"
    config.write_text(f"data:\n  path: {data}\n  tokenizer: {tok}\nmax_steps: {STEPS}\n")
    t0 = time.monotonic()
    refs = References(work, config)
    chains = []
    print(f"work folder {work}", flush=True)
    for i in range(args.runs):
        chain = dict(one_chain(i, work, tok, data, refs, rng), seed=args.seed)
        chains.append(chain)
        bad = [n for n, c in chain["cases"].items() if not c["survived"]]
        print(f"run {i + 1}/{args.runs}: {chain['wall_s']:.0f} s, {len(CASES) - len(bad)}/{len(CASES)} cases survived"
              + (f"; not: {bad} {[chain['cases'][n]['notes'] for n in bad]}" if bad else ""), flush=True)
        if not bad and not args.keep:
            shutil.rmtree(chain["dir"], ignore_errors=True)
        # after every run: an interrupted matrix keeps its honest N
        write(chains, [args.seed], 1 + len(refs.rollback), time.monotonic() - t0, [str(work)], args.runs)
    return 0 if all(c["survived"] for chain in chains for c in chain["cases"].values()) else 1


def write(chains: list[dict], seeds: list[int], reference_runs: int, wall_s: float, work_dirs: list[str],
          runs_asked: int) -> None:
    """Print the table and write ``bench/results/fault_matrix.json`` for ``chains`` (every run so far)."""
    rows = []
    for name in CASES:
        runs = [chain["cases"][name] for chain in chains]
        times = [r["time_to_resume_s"] for r in runs if r["time_to_resume_s"] == r["time_to_resume_s"]]
        rows.append({"case": name, "runs": len(runs), "survived": sum(r["survived"] for r in runs),
                     "steps_lost": sum(r["steps_lost"] for r in runs), "worst_time_to_resume_s": max(times, default=float("nan"))})
    print(f"{'case':<84} {'runs':>4} {'survived':>8} {'steps lost':>10} {'worst resume s':>14}")
    for row in rows:
        print(f"{row['case']:<84} {row['runs']:>4} {row['survived']:>8} {row['steps_lost']:>10} "
              f"{row['worst_time_to_resume_s']:>14.1f}", flush=True)
    write_result("fault_matrix", "Fault matrix (2 CPU ranks, llama-test, fp32, ZeRO 2)", [],
                 {"cases": rows, "survived_means": SURVIVED, "runs": chains, "seed": seeds[0] if len(seeds) == 1 else seeds,
                  "steps": STEPS, "runs_per_case": len(chains), "runs_asked": runs_asked, "reference_runs": reference_runs,
                  "wall_s": round(wall_s, 1), "work_dir": work_dirs[0] if len(work_dirs) == 1 else work_dirs,
                  "method": "one chain per run: one run folder takes every fault in turn; each launch resumes "
                            "from the previous fault and injects the next (see bench/fault_matrix.py)"})


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
