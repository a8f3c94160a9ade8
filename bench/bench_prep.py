"""Prep throughput and memory: lmforge prep against raw ``tokenizers`` and the ``datasets`` pipeline.

Setting (issue 3): the Python standard library as a jsonl corpus, one document per file (the first
``--corpus-mb`` MB of text of ``common.stdlib_texts``, default 16; ``--corpus-mb 0`` takes all of
it, about 31.5 MB, the issue's setting, and doubles the run time), a 16k byte-level BPE trained on
it, every core of this machine. Corpus files and tokenizer are built once under ``--work``.

Measured side by side, alternating, each trial in a fresh process, median of ``--reps`` (>= 3):

- ``raw``: ``tokenizers.Tokenizer.encode_batch`` over the texts, already in memory (only the call is
  timed);
- ``lmforge``: ``data_prep.prep.prepare`` end to end: read the jsonl, tokenize, pack, write shards,
  merge, manifest;
- ``hf``: the Hugging Face ``run_clm.py`` pipeline: ``load_dataset("json")``, then
  ``map(tokenize, batched=True, num_proc)`` and ``map(group_texts, batched=True, num_proc)``,
  with a fresh cache folder.

Throughput ratios are ``t_peer / t_lmforge`` over the same texts (targets: >= 0.95x against raw,
>= 1.3x against hf), in wall time and, less sensitive to other load on the machine, in CPU time
(user + system, worker processes included). Peak memory is the largest sum over the process tree
(main + workers), sampled every 20 ms (PSS, so pages shared with forked workers count once), for
every trial, and for lmforge on 4 copies of the corpus (target: <= 1.5 GB, and flat: the 4x peak at
most 1.2x the largest 1x peak) and on one 50 MB single-line document.

Reported separately, prep's fixed cost (issue 17 section 4): ``python -m lmforge prep`` as a whole
process on 5 short documents (interpreter start, imports, tokenizer load, plan, write, merge;
bytecode cached, as installed), median wall and CPU seconds (target: < 0.5 s), next to importing
numpy, pyarrow and tokenizers alone (the floor: what prep cannot do without) and a bare
``python -c pass`` for scale; in
``bench/results/bench_prep_fixed.json``.

Usage: ``python bench/bench_prep.py [--work bench/.cache/prep] [--reps 3] [--corpus-mb 16]
[--skip-memory] [--fixed-only] [--json FILE]``; writes ``bench/results/bench_prep.json`` (and a
copy to ``--json`` when given) and ``bench_prep_fixed.json``. ``--child`` is the entry point of one trial.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

SEQ_LEN = 1024
VOCAB = 16384
DOC_BYTES = 50_000_000
RSS_LIMIT_MIB = 1536
FLAT_LIMIT_X = 1.2
RAW_TARGET_X, HF_TARGET_X = 0.95, 1.3
FIXED_DOCS = 5
FIXED_TARGET_S = 0.5


def build_inputs(work: Path, corpus_mb: float) -> tuple[Path, dict[str, str]]:
    """``(folder, {"1x", "4x", "doc50mb": jsonl path})`` of the corpus and its 16k tokenizer (``tok16k``), built once."""
    def build(tmp: Path) -> None:
        texts = common.stdlib_texts()
        if corpus_mb > 0:
            kept, size = [], 0
            for text in texts:
                if size >= corpus_mb * 1e6:
                    break
                kept.append(text)
                size += len(text.encode("utf-8"))
            texts = kept
        common.write_jsonl(tmp / "corpus.jsonl", texts)
        lines = (tmp / "corpus.jsonl").read_text(encoding="utf-8")
        (tmp / "corpus4x.jsonl").write_text(lines * 4, encoding="utf-8")
        big = "".join(texts)
        common.write_jsonl(tmp / "doc50mb.jsonl", [(big * (DOC_BYTES // len(big) + 1))[:DOC_BYTES]])
        from data_prep.tokenizer.train import train_byte_bpe

        train_byte_bpe([str(tmp / "corpus.jsonl")], tmp / "tok16k", vocab_size=VOCAB, model_max_length=SEQ_LEN)

    folder = common.cached_build(work / (f"stdlib-{corpus_mb:g}mb" if corpus_mb > 0 else "stdlib-all"), build)
    return folder, {k: str(folder / f) for k, f in (("1x", "corpus.jsonl"), ("4x", "corpus4x.jsonl"),
                                                    ("doc50mb", "doc50mb.jsonl"))}


# ---------------------------------------------------------------- children (one trial each)

def _child_raw(corpus: str, tok_dir: str, out: str) -> dict:
    from tokenizers import Tokenizer

    with open(corpus, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    cpu, start = common.cpu_seconds(True), time.perf_counter()
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    elapsed, cpu = time.perf_counter() - start, common.cpu_seconds(True) - cpu
    return {"seconds": elapsed, "cpu_seconds": cpu, "tokens": sum(len(e.ids) for e in encodings)}


def _child_lmforge(corpus: str, tok_dir: str, out: str) -> dict:
    from data_prep.prep import PrepConfig, prepare
    from data_prep.tokenizer.ids import tokenizer_info

    tokenizer_info(tok_dir)  # imports tokenizers: start-up, kept off the clock as for the peers (measure_fixed_cost)

    cpu, start = common.cpu_seconds(True), time.perf_counter()
    manifest = prepare(PrepConfig(inputs=[corpus], tokenizer=tok_dir, output=out, seq_len=SEQ_LEN, overwrite=True,
                                  show_progress=False))
    elapsed, cpu = time.perf_counter() - start, common.cpu_seconds(True) - cpu
    assert manifest is not None  # one task: prepare merges and returns the manifest
    return {"seconds": elapsed, "cpu_seconds": cpu, "tokens": manifest["counts"]["tokens"]}


def _child_hf(corpus: str, tok_dir: str, out: str) -> dict:
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    shutil.rmtree(out, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    num_proc = len(os.sched_getaffinity(0))

    def tokenize(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):  # transformers/examples/pytorch/language-modeling/run_clm.py
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(concatenated[list(examples.keys())[0]]) // SEQ_LEN) * SEQ_LEN
        result = {k: [t[i: i + SEQ_LEN] for i in range(0, total, SEQ_LEN)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    cpu, start = common.cpu_seconds(True), time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=out)
    ds = ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])
    ds = ds.map(group_texts, batched=True, num_proc=num_proc)
    elapsed, cpu = time.perf_counter() - start, common.cpu_seconds(True) - cpu
    return {"seconds": elapsed, "cpu_seconds": cpu, "tokens": len(ds) * SEQ_LEN, "sequences": len(ds)}


CHILDREN = {"lmforge": _child_lmforge, "raw": _child_raw, "hf": _child_hf}


# ---------------------------------------------------------------- parent

def run_trial(method: str, corpus: str, tok_dir: str, out: str) -> dict:
    """Run one trial in a fresh process; add the peak memory (bytes) of its whole process tree.

    Memory is the sum of PSS (proportional set size: pages shared by forked workers counted
    once in all) where Linux reports it, else of RSS.

    Raises:
        RuntimeError: the trial failed (its output included).
    """
    import psutil

    def used(p: psutil.Process) -> int:
        try:
            return p.memory_full_info().pss
        except (AttributeError, psutil.AccessDenied):
            return p.memory_info().rss

    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        proc = psutil.Popen([sys.executable, str(Path(__file__).resolve()), "--child", method, corpus, tok_dir, out],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **common.python_env()})
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, sum(used(p) for p in [proc] + proc.children(recursive=True)))
            except psutil.Error:
                pass
            time.sleep(0.02)
        log.seek(0)
        output = log.read()
    result = common.parse_result(common.ChildResult(proc.returncode, 0.0, peak, output[-20000:]), f"{method} trial")
    result["peak_rss_bytes"] = peak
    return result


def _process_seconds(cmd: list[str], what: str, pycache: Path) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one child process run to completion (CPU: user + system, its children
    included), with compiled bytecode cached under ``pycache`` as an installed package has it (even where
    ``PYTHONDONTWRITEBYTECODE`` is set, which makes every start compile lmforge's modules from source)."""
    before = common.cpu_seconds(True) - common.cpu_seconds(False)
    result = common.run_child(cmd, env=common.python_env(PYTHONDONTWRITEBYTECODE="", PYTHONPYCACHEPREFIX=str(pycache)))
    common.check_child(result, what)
    return result.wall_s, common.cpu_seconds(True) - common.cpu_seconds(False) - before


def measure_fixed_cost(work: Path, tok_dir: str, reps: int) -> list[dict]:
    """Rows of prep's fixed cost: ``lmforge prep`` on :data:`FIXED_DOCS` short documents as a whole process
    (default workers, no progress bar), and ``python -c pass``; alternating, median of ``reps``."""
    tiny = work / "tiny.jsonl"
    common.write_jsonl(tiny, [f"document {i} of the fixed-cost run. " * 20 for i in range(FIXED_DOCS)])
    prep = common.lmforge_cmd("prep", "--input", str(tiny), "--tokenizer", tok_dir, "--output", str(work / "out_tiny"),
                              "--seq-len", "64", "--no-progress", "--overwrite")
    runs: dict[str, list[tuple[float, float]]] = {"prep": [], "floor": [], "bare": []}

    def side(name: str, cmd: list[str]) -> float:
        runs[name].append(_process_seconds(cmd, f"fixed-cost {name} run", work / "pycache"))
        return runs[name][-1][0]

    _process_seconds(prep, "fixed-cost warm-up run", work / "pycache")  # writes the bytecode cache
    floor = [sys.executable, "-c", "import numpy, pyarrow, tokenizers"]
    bare = [sys.executable, "-c", "pass"]
    common.alternate({"prep": lambda: side("prep", prep), "floor": lambda: side("floor", floor),
                      "bare": lambda: side("bare", bare)}, reps)
    wall = {k: [w for w, _ in v] for k, v in runs.items()}
    cpu = {k: [c for _, c in v] for k, v in runs.items()}
    own = [p - f for p, f in zip(cpu["prep"], cpu["floor"])]  # paired by round: the same machine load
    what = f"whole `lmforge prep` process, {FIXED_DOCS} documents"
    load = f"1-min load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores at the end"
    return [
        common.row(f"fixed cost, wall time, {what}", "s", wall["prep"], target=f"< {FIXED_TARGET_S} s",
                   note=f"interpreter start, imports, tokenizer load, plan, shards, merge, manifest; {load}"),
        common.row(f"fixed cost, CPU time, {what}", "CPU s", cpu["prep"], target=f"< {FIXED_TARGET_S} s",
                   note="user + system, workers included; less sensitive to other load than wall time"),
        common.row("importing numpy, pyarrow and tokenizers alone (`python -c`), the floor prep cannot go below",
                   "CPU s", cpu["floor"], note=f"wall {common.median(wall['floor']):.3f} s; pyarrow imports numpy"),
        common.row("fixed cost above that floor: lmforge's own share (CPU, prep - floor per round)", "CPU s", own,
                   note="argument parsing, lmforge's modules, tokenizer load, dedup pass, shards, merge, manifest"),
        common.row("bare interpreter start (`python -c pass`), for scale", "s", wall["bare"],
                   note=f"CPU {common.median(cpu['bare']):.3f} s"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(common.CACHE_DIR / "prep"),
                        help="cache folder of the corpus files and the tokenizer, and the trials' outputs")
    parser.add_argument("--reps", type=int, default=common.MIN_REPEATS, help="alternating rounds (>= 3)")
    parser.add_argument("--corpus-mb", type=float, default=16.0,
                        help="MB of stdlib text in the 1x corpus; 0: all of it (~31.5 MB, the issue's setting)")
    parser.add_argument("--json", default=None, help="also write the result JSON here")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 4x corpus and 50 MB document runs")
    parser.add_argument("--fixed-only", action="store_true", help="measure prep's fixed cost only")
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "CORPUS", "TOKENIZER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.use_this_checkout()
    if args.child:
        method, corpus, tok_dir, out = args.child
        print(common.result_line(CHILDREN[method](corpus, tok_dir, out)), flush=True)
        return 0
    work = Path(args.work)
    folder, corpus = build_inputs(work, args.corpus_mb)
    tok_dir = str(folder / "tok16k")
    mb = os.path.getsize(corpus["1x"]) / 1e6
    cores = len(os.sched_getaffinity(0))
    fixed = measure_fixed_cost(work, tok_dir, args.reps)
    common.print_rows(fixed)
    common.write_result("bench_prep_fixed", "Prep's fixed cost: a whole lmforge prep process on a tiny input", fixed,
                        {"documents": FIXED_DOCS, "reps": args.reps, "cores": cores,
                         "load_average_1min": round(os.getloadavg()[0], 2), "bytecode": "cached"})
    if args.fixed_only:
        return 0
    print(f"corpus {mb:.1f} MB jsonl, tokenizer {VOCAB} byte-level BPE, seq_len {SEQ_LEN}, {cores} cores", flush=True)
    trials: dict[str, list[dict]] = {m: [] for m in CHILDREN}

    def trial(method: str) -> float:
        r = run_trial(method, corpus["1x"], tok_dir, str(work / f"out_{method}"))
        trials[method].append(r)
        print(f"    {method:8s} {r['seconds']:7.2f} s  ({r['cpu_seconds']:6.2f} CPU s)  "
              f"peak memory {r['peak_rss_bytes'] / 2**20:6.0f} MiB", flush=True)
        return r["seconds"]

    # alternate, so drifting machine load hits every method alike
    common.alternate({m: functools.partial(trial, m) for m in CHILDREN}, args.reps)
    seconds = {m: [t["seconds"] for t in ts] for m, ts in trials.items()}
    cpu = {m: [t["cpu_seconds"] for t in ts] for m, ts in trials.items()}
    peak_mib = {m: [t["peak_rss_bytes"] / 2**20 for t in ts] for m, ts in trials.items()}
    raw_name, hf_name = "tokenizers encode_batch (in memory, call only)", "datasets.map + group_texts (run_clm.py)"
    what = f"{mb:.1f} MB jsonl"
    rows = [
        common.row(f"wall time, {what}", "s", seconds["lmforge"], seconds["raw"], raw_name, better="lower",
                   target=f">= {RAW_TARGET_X}x", note="lmforge end to end: read, tokenize, pack, write shards, manifest"),
        common.row(f"wall time, {what}", "s", seconds["lmforge"], seconds["hf"], hf_name, better="lower",
                   target=f">= {HF_TARGET_X}x"),
        common.row(f"CPU time, {what}", "CPU s", cpu["lmforge"], cpu["raw"], raw_name, better="lower",
                   note="user + system, workers included; less sensitive to other load than wall time"),
        common.row(f"CPU time, {what}", "CPU s", cpu["lmforge"], cpu["hf"], hf_name, better="lower"),
        common.row(f"peak memory (PSS, process tree), {what}", "MiB", peak_mib["lmforge"], peak_mib["hf"], hf_name,
                   better="lower"),
    ]
    details = {"corpus_mb": round(mb, 2), "corpus": corpus, "tokenizer": tok_dir, "seq_len": SEQ_LEN, "vocab_size": VOCAB,
               "cores": cores, "reps": args.reps, "trials": trials,
               "tokens": {m: ts[-1]["tokens"] for m, ts in trials.items()}}
    if not args.skip_memory:
        peak_1x = max(t["peak_rss_bytes"] for t in trials["lmforge"])
        runs = {}
        for name in ("4x", "doc50mb"):
            runs[name] = run_trial("lmforge", corpus[name], tok_dir, str(work / f"out_{name}"))
            print(f"  lmforge {name:8s} {runs[name]['seconds']:7.2f} s  peak memory "
                  f"{runs[name]['peak_rss_bytes'] / 2**20:6.0f} MiB", flush=True)
        details["memory_runs"] = runs
        peak_4x, peak_doc = runs["4x"]["peak_rss_bytes"] / 2**20, runs["doc50mb"]["peak_rss_bytes"] / 2**20
        rows += [
            common.row(f"peak memory, 4 copies of the corpus ({4 * mb:.0f} MB)", "MiB", peak_4x,
                       target=f"<= {RSS_LIMIT_MIB} MiB", note="one run"),
            common.row("peak memory, 4x corpus / 1x corpus", "x", peak_4x / (peak_1x / 2**20),
                       target=f"<= {FLAT_LIMIT_X}x", note="flat in the corpus size; 1x: the largest of the trials"),
            common.row(f"peak memory, one {DOC_BYTES / 1e6:.0f} MB single-line document", "MiB", peak_doc,
                       target=f"<= {RSS_LIMIT_MIB} MiB", note="one run"),
        ]
    common.print_rows(rows)
    print(f"lmforge prep vs raw tokenizers encode_batch: {rows[0]['ratio']:.2f}x wall time (target >= {RAW_TARGET_X}), "
          f"{rows[2]['ratio']:.2f}x CPU time")
    print(f"lmforge prep vs datasets.map + group_texts:  {rows[1]['ratio']:.2f}x wall time (target >= {HF_TARGET_X}), "
          f"{rows[3]['ratio']:.2f}x CPU time")
    print(f"(1-minute load average {os.getloadavg()[0]:.1f} on {cores} cores: other processes inflate the wall times; "
          "the CPU-time ratios are less sensitive to them)")
    common.write_result("bench_prep", "Prep vs raw tokenizers encode_batch and datasets.map + group_texts", rows,
                        details, copy_to=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
