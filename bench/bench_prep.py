"""Prep throughput, fixed overhead and memory: ``lmforge prep`` against raw ``tokenizers``, datatrove and ``datasets``.

Setting (issue 18): the Python standard library as jsonl, one document per file, in two files
(``prep_peers.build_corpus``: every document unique and non-blank, repeated with a ``# copy K``
line where the stdlib's ~31 MB is too small), a 16k byte-level BPE trained on the 16 MB corpus,
1024-token sequences. Swept over corpus sizes (MB of text) and worker processes; inputs are built
once under ``--work`` (default ``bench/.cache/prep``, git-ignored).

Every trial is a whole process, started fresh; per (size, workers) the sides alternate, median of
``--reps`` (>= 3):

- ``lmforge``: ``python -m lmforge prep --input part-0.jsonl part-1.jsonl --seq-len 1024
  --val-fraction 0 --workers N --no-progress --overwrite`` (defaults otherwise: exact dedup on; no
  validation split, so the packed stream is the whole corpus in order). Its *in-task* time is the
  task's own clock (``manifest.json`` ``tasks.elapsed_s``: dedup hash pass, read, parse, tokenize,
  pack, write shards); the rest of the process wall time is its *fixed overhead* (interpreter,
  imports, tokenizer load, plan, merge, manifest);
- ``raw``: ``tokenizers.Tokenizer.encode_batch_fast`` (the call prep makes) in prep's process and
  thread layout, JSON parsing and EOS inside its timer (``prep_peers.run_raw``);
- ``datatrove`` (when installed): ``JsonlReader`` + ``DocumentTokenizer``, ``tasks = workers = N``, at sizes up
  to :data:`DATATROVE_MAX_MB` only (its peak memory grows with the corpus);
- ``hf``: ``datasets.map`` as transformers' ``run_clm.py`` does, at sizes up to :data:`HF_MAX_MB` only
  (about 2.5x slower than prep: it would dominate the larger sweeps).

Units: seconds (wall, or CPU = user + system with worker processes), tokens/s, MiB (peak PSS of
the process tree, sampled every 50 ms in every trial), MB = 10**6 bytes of jsonl input. Ratios
are ``t_peer / t_lmforge`` (``lmforge / peer`` for tokens/s): above 1, lmforge is faster. The
token streams are checked: lmforge's packed sequences must equal the raw peer's and datatrove's
ids (document ids + EOS, corpus order; ``prep_peers.stream_digest``), else the script exits 1.
With two or more sizes, ``t = a + b * MB`` is fitted to each side's process wall time, round by
round: ``a`` the fixed cost (s), ``b`` the cost per MB (s/MB); a peer's fit and lmforge's against it use the
sizes that peer ran at.

Also measured: peak memory of lmforge on 4x the 16 MB corpus (target <= 1.5 GB, and flat: at
most 1.2x the 16 MB peak) and on one 50 MB single-line document; and prep's fixed cost on 5 tiny
documents (issue 17 section 4) next to importing numpy, pyarrow and tokenizers alone, in
``bench/results/bench_prep_fixed.json``.

Usage: ``python bench/bench_prep.py [--reps 3] [--workers 1,2] [--sizes 16] [--skip-memory]
[--fixed-only] [--no-datatrove] [--no-hf] [--json FILE]``: 16 MB at 1 and 2 workers (``make bench``;
2.5 minutes on 2 idle cores, 16 at load average 8-9), to ``bench/results/bench_prep.json``. ``--full``
(``make bench-full``): 16, 256 and 1024 MB (46 minutes on 2 idle cores, 2026-12-03; about 1.4 GB of corpora
under ``--work``), to
``bench/results/bench_prep_full.json``, every row's note marked ``(bench-full)``, no memory or
fixed-cost runs; ``--full --sizes 2,4`` runs that path on small corpora (a smoke test).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import common
import prep_peers as peers

SEQ_LEN = peers.SEQ_LEN
VOCAB = 16384
DOC_BYTES = 50_000_000
RSS_LIMIT_MIB = 1536
FLAT_LIMIT_X = 1.2
HF_TARGET_X = 1.3
FIXED_DOCS = 5
FIXED_TARGET_S = 0.5
DEFAULT_SIZES, FULL_SIZES = (16.0,), (16.0, 256.0, 1024.0)
HF_MAX_MB = 16.0
"""The ``datasets`` peer runs at corpus sizes up to this many MB only."""
DATATROVE_MAX_MB = 256.0
"""The datatrove peer runs at corpus sizes up to this many MB only: its peak memory grows with the corpus (about
0.75 GiB at 16 MB and 10.6 GiB at 266 MB of jsonl, measured by ``--full`` on 2026-12-03), so 1 GB would need
about 40 GiB, beyond this machine's 24 GiB."""
SAMPLE_S = 0.05


def build_tokenizer(work: Path) -> str:
    """The folder of the 16k byte-level BPE trained on the 16 MB corpus, built once."""
    def build(tmp: Path) -> None:
        from data_prep.tokenizer.train import train_byte_bpe

        train_byte_bpe(peers.corpus_files(peers.build_corpus(work, 16.0)), tmp / "tok16k", vocab_size=VOCAB,
                       model_max_length=SEQ_LEN)

    return str(common.cached_build(work / "tokenizer", build) / "tok16k")


def build_doc50mb(work: Path) -> str:
    """A jsonl file of one 50 MB document (the 16 MB corpus's text repeated), built once."""
    def build(tmp: Path) -> None:
        texts = [json.loads(line)["text"] for f in peers.corpus_files(peers.build_corpus(work, 16.0))
                 for line in open(f, encoding="utf-8")]
        big = "".join(texts)
        common.write_jsonl(tmp / "doc50mb.jsonl", [(big * (DOC_BYTES // len(big) + 1))[:DOC_BYTES]])

    return str(common.cached_build(work / "doc50mb", build) / "doc50mb.jsonl")


# ---------------------------------------------------------------- one trial: a whole process

def run_process(cmd: list[str], what: str) -> dict:
    """Run ``cmd`` to completion: ``wall_s``, ``cpu_s`` (user + system, its children included), ``peak_bytes``
    (largest sum of PSS over the process tree, RSS where PSS is unknown, sampled every :data:`SAMPLE_S`)
    and ``output`` (stdout + stderr, last 20,000 characters).

    Raises:
        RuntimeError: the process failed (its output included).
    """
    import subprocess
    import tempfile

    import psutil

    def used(p: psutil.Process) -> int:
        try:
            return p.memory_full_info().pss
        except (AttributeError, psutil.AccessDenied):
            return p.memory_info().rss

    cpu = common.cpu_seconds(True) - common.cpu_seconds(False)
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        start = time.perf_counter()
        proc = psutil.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **common.python_env()})
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, sum(used(p) for p in [proc] + proc.children(recursive=True)))
            except psutil.Error:
                pass
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()[-20000:]
    common.check_child(common.ChildResult(proc.returncode, wall, peak, output), what)
    return {"wall_s": wall, "cpu_s": common.cpu_seconds(True) - common.cpu_seconds(False) - cpu, "peak_bytes": peak,
            "output": output}


def lmforge_trial(files: list[str], tok_dir: str, out: str, workers: int | None) -> dict:
    """One ``lmforge prep`` process (module docstring); adds ``in_task_s``, ``dedup_s`` (its log's dedup hash pass,
    0.1 s resolution) and ``tokens`` (stream tokens, EOS included) from its manifest."""
    from data_prep.shards import read_manifest

    cmd = common.lmforge_cmd("prep", "--input", *files, "--tokenizer", tok_dir, "--output", out, "--seq-len", str(SEQ_LEN),
                             "--val-fraction", "0", "--no-progress", "--overwrite",
                             *(["--workers", str(workers)] if workers else []))
    r = run_process(cmd, "lmforge prep trial")
    manifest = read_manifest(out)
    dedup = re.search(r"dedup hash pass ([0-9.]+) s", r.pop("output"))
    return {**r, "in_task_s": sum(manifest["tasks"]["elapsed_s"]), "dedup_s": float(dedup.group(1)) if dedup else None,
            "tokens": manifest["counts"]["tokens"], "duplicates": manifest["counts"]["duplicates"],
            "rejects": manifest["counts"]["rejects"]}


def peer_trial(method: str, corpus_dir: Path, tok_dir: str, out: str, workers: int) -> dict:
    """One ``prep_peers.py`` process; its result line (``in_task_s``, ``tokens``, digest) merged in."""
    cmd = [sys.executable, str(Path(peers.__file__).resolve()), method, str(corpus_dir), tok_dir, out, str(workers)]
    r = run_process(cmd, f"{method} peer trial")
    payload = common.parse_result(common.ChildResult(0, r["wall_s"], r["peak_bytes"], r.pop("output")), method)
    return {**r, **payload}


# ---------------------------------------------------------------- one (size, workers) setting

def measure_setting(work: Path, tok_dir: str, mb: float, workers: int, methods: list[str], reps: int) -> dict:
    """Alternating trials of ``methods`` on the ``mb``-MB corpus at ``workers``, then the token-stream check
    (digests of lmforge's output and of each peer's stream, every round); the outputs are removed after."""
    corpus = peers.build_corpus(work, mb)
    files = peers.corpus_files(corpus)
    outs = {m: str(work / "out" / f"{m}-{mb:g}mb-w{workers}") for m in methods}
    trials: dict[str, list[dict]] = {m: [] for m in methods}
    mbytes = sum(os.path.getsize(f) for f in files) / 1e6
    print(f"{mbytes:.1f} MB jsonl, {workers} worker(s): {', '.join(methods)}", flush=True)

    def trial(method: str) -> float:
        r = (lmforge_trial(files, tok_dir, outs[method], workers) if method == "lmforge"
             else peer_trial(method, corpus, tok_dir, outs[method], workers))
        if method == "lmforge":  # digests of the outputs: after the process, off its clock
            r.update(peers.lmforge_digest(outs[method]))
        elif method == "datatrove":
            r.update(peers.datatrove_digest(outs[method], max(workers, 1)))
        trials[method].append(r)
        print(f"    {method:9s} process {r['wall_s']:7.2f} s, in task {r['in_task_s']:7.2f} s, {r['cpu_s']:7.2f} CPU s, "
              f"peak {r['peak_bytes'] / 2**20:5.0f} MiB", flush=True)
        return r["wall_s"]

    common.alternate({m: functools.partial(trial, m) for m in methods}, reps)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    streams = {m: sorted({(t["tokens"], t["sha256"]) for t in ts}) for m, ts in trials.items() if "sha256" in ts[0]}
    equal = all(s == streams["lmforge"] for s in streams.values()) and len(streams["lmforge"]) == 1
    print(f"  token streams {'equal' if equal else 'DIFFER'}: " + ", ".join(f"{m} {s}" for m, s in streams.items()), flush=True)
    return {"size_mb": mb, "jsonl_mb": round(mbytes, 2), "workers": workers, "trials": trials,
            "streams": {m: [list(x) for x in s] for m, s in streams.items()}, "streams_equal": equal}


def layout(workers: int) -> str:
    """The process and thread layout lmforge prep uses at ``workers``, which the raw peer copies."""
    cores = len(os.sched_getaffinity(0))
    if workers <= 1:
        return f"1 process, tokenizers threads at their default ({cores}: every core)"
    return (f"main process reads 1 MiB blocks, {workers} fork worker processes encode them, "
            f"{'TOKENIZERS_PARALLELISM=false' if cores // workers <= 1 else f'RAYON_NUM_THREADS={cores // workers}'}")


def peer_names(workers: int) -> dict[str, str]:
    return {"raw": f"{peers.RAW_NAME}; {layout(workers)}",
            "datatrove": peers.DATATROVE_NAME.replace("=N", f"={workers}") +
            ("; TOKENIZERS_PARALLELISM=false" if workers > 1 else "; tokenizers threads at their default") +
            f"; run at <= {DATATROVE_MAX_MB:g} MB only",
            "hf": peers.HF_NAME.replace("=N", f"={workers}") + f"; run at <= {HF_MAX_MB:g} MB only"}


def setting_rows(s: dict, tag: str) -> list[dict]:
    """The rows of one setting (see the module docstring): in-task throughput, process wall, fixed overhead,
    CPU time, and peak memory against ``hf``."""
    t, w = s["trials"], s["workers"]
    label, names = f"{s['jsonl_mb']:.1f} MB jsonl, {w} worker(s)", peer_names(w)
    others = [m for m in ("raw", "datatrove", "hf") if m in t]

    def col(m: str, key: str) -> list[float]:
        return [x[key] for x in t[m]]

    def tps(m: str) -> list[float]:
        return [x["tokens"] / x["in_task_s"] for x in t[m]]

    def overhead(m: str) -> list[float]:
        return [x["wall_s"] - x["in_task_s"] for x in t[m]]

    dedup = [x["dedup_s"] for x in t["lmforge"] if x["dedup_s"] is not None]
    stream = (f"token streams equal: {t['lmforge'][0]['tokens']:,} tokens, sha256 {t['lmforge'][0]['sha256'][:12]}"
              if s["streams_equal"] else "token streams DIFFER (see details)")
    in_task = (f"lmforge: the task's own clock (read, parse, tokenize, pack, write shards; dedup hash pass "
               f"{common.median(dedup) if dedup else float('nan'):.1f} s of it); {stream}")
    rows = [common.row(f"in-task throughput, {label}", "tokens/s", tps("lmforge"), tps(m), names[m], better="higher",
                       target=">= 0.95x" if m == "raw" else "", note=f"{in_task} {tag}".strip())
            for m in others if m != "hf"]
    rows += [common.row(f"whole process wall time, {label}", "s", col("lmforge", "wall_s"), col(m, "wall_s"), names[m],
                        better="lower", target=f">= {HF_TARGET_X}x" if m == "hf" else "",
                        note=f"from start to exit, interpreter and imports included {tag}".strip()) for m in others]
    rows.append(common.row(f"fixed overhead (process wall - in-task time), {label}", "s", overhead("lmforge"), overhead("raw"),
                           names["raw"], better="lower",
                           note=("lmforge: interpreter, imports, tokenizer load, plan, merge, manifest; raw: interpreter, "
                                 f"imports, tokenizer load, the digest after its timer {tag}").strip()))
    rows += [common.row(f"CPU time, whole process, {label}", "CPU s", col("lmforge", "cpu_s"), col(m, "cpu_s"), names[m],
                        better="lower", note=f"user + system, workers included; steadier than wall time on a busy "
                                             f"machine {tag}".strip()) for m in others]
    if "hf" in t:
        rows.append(common.row(f"peak memory (PSS, process tree), {label}", "MiB",
                               [b / 2**20 for b in col("lmforge", "peak_bytes")], [b / 2**20 for b in col("hf", "peak_bytes")],
                               names["hf"], better="lower", note=f"sampled every {SAMPLE_S * 1000:.0f} ms {tag}".strip()))
    return rows


def _wall_fits(group: list[dict], method: str) -> list[tuple[float, float]]:
    """``(b, a)`` of the least-squares line ``wall_s = a + b * jsonl_mb`` over the settings in ``group``, per round."""
    runs = [[trial["wall_s"] for trial in s["trials"][method]] for s in group]
    return [(b, a) for a, b in common.line_fits([s["jsonl_mb"] for s in group], runs)]


def fit_rows(settings: list[dict], tag: str) -> list[dict]:
    """``t = a + b * MB`` fitted to each side's process wall time over the sizes, round by round (least squares):
    rows of ``a`` (fixed cost, s) and ``b`` (cost per MB of jsonl, s/MB), per worker count with two or more sizes."""
    rows = []
    for w in sorted({s["workers"] for s in settings}):
        group = sorted((s for s in settings if s["workers"] == w), key=lambda s: s["jsonl_mb"])
        for m in ("raw", "datatrove"):
            sub = [s for s in group if m in s["trials"]]  # datatrove stops at DATATROVE_MAX_MB: fit both on its sizes
            if len(sub) < 2:
                continue
            sizes = ", ".join(f"{s['jsonl_mb']:.0f}" for s in sub)
            lm, peer = _wall_fits(sub, "lmforge"), _wall_fits(sub, m)
            rows += [
                common.row(f"fixed cost a of t = a + b * MB (process wall), {sizes} MB jsonl, {w} worker(s)", "s",
                           [a for _, a in lm], [a for _, a in peer], peer_names(w)[m], better="lower",
                           note=f"least squares per round over the sizes {tag}".strip()),
                common.row(f"cost per MB b of t = a + b * MB (process wall), {sizes} MB jsonl, {w} worker(s)", "s/MB",
                           [b for b, _ in lm], [b for b, _ in peer], peer_names(w)[m], better="lower",
                           note=f"1 / b: MB/s once started {tag}".strip()),
            ]
    return rows


def memory_rows(work: Path, tok_dir: str, settings: list[dict], workers: int) -> tuple[list[dict], dict]:
    """lmforge's peak memory on 4x the 16 MB corpus and on one 50 MB document (one run each, ``workers``),
    against its largest peak on the 16 MB corpus (the smallest swept, if 16 MB was not) at ``workers``."""
    base = min((s for s in settings if s["workers"] == workers), key=lambda s: abs(s["size_mb"] - 16.0))
    peak_1x = max(t["peak_bytes"] for t in base["trials"]["lmforge"]) / 2**20
    runs = {}
    for name, files in (("4x", peers.corpus_files(peers.build_corpus(work, 4 * base["size_mb"]))),
                        ("doc50mb", [build_doc50mb(work)])):
        out = str(work / "out" / f"memory-{name}")
        runs[name] = lmforge_trial(files, tok_dir, out, workers)
        shutil.rmtree(out, ignore_errors=True)
        print(f"  lmforge {name:8s} {runs[name]['wall_s']:7.2f} s  peak memory {runs[name]['peak_bytes'] / 2**20:6.0f} MiB",
              flush=True)
    peak_4x, peak_doc = runs["4x"]["peak_bytes"] / 2**20, runs["doc50mb"]["peak_bytes"] / 2**20
    rows = [
        common.row(f"peak memory, 4x the corpus ({4 * base['size_mb']:.0f} MB of text), {workers} worker(s)", "MiB", peak_4x,
                   target=f"<= {RSS_LIMIT_MIB} MiB", note="one run; PSS of the process tree"),
        common.row("peak memory, 4x corpus / 1x corpus", "x", peak_4x / peak_1x, target=f"<= {FLAT_LIMIT_X}x",
                   note=f"flat in the corpus size; 1x: the largest of the {base['jsonl_mb']:.1f} MB trials"),
        common.row(f"peak memory, one {DOC_BYTES / 1e6:.0f} MB single-line document, {workers} worker(s)", "MiB", peak_doc,
                   target=f"<= {RSS_LIMIT_MIB} MiB", note="one run"),
    ]
    return rows, runs


# ---------------------------------------------------------------- fixed cost


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


def _sizes(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(common.CACHE_DIR / "prep"),
                        help="cache folder of the corpora and the tokenizer, and the trials' outputs")
    parser.add_argument("--reps", type=int, default=common.MIN_REPEATS, help="alternating rounds (>= 3)")
    parser.add_argument("--full", action="store_true",
                        help=f"sizes {', '.join(f'{x:g}' for x in FULL_SIZES)} MB (make bench-full), to bench_prep_full.json")
    parser.add_argument("--sizes", type=_sizes, default=None, help="comma-separated corpus sizes, MB of text "
                        f"(default {', '.join(f'{x:g}' for x in DEFAULT_SIZES)}; with --full "
                        f"{', '.join(f'{x:g}' for x in FULL_SIZES)})")
    parser.add_argument("--workers", type=lambda t: tuple(int(x) for x in t.split(",")), default=(1, 2),
                        help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--no-datatrove", action="store_true", help="leave the datatrove peer out")
    parser.add_argument("--no-hf", action="store_true", help="leave the datasets peer out")
    parser.add_argument("--json", default=None, help="also write the result JSON here")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 4x corpus and 50 MB document runs")
    parser.add_argument("--fixed-only", action="store_true", help="measure prep's fixed cost only")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or (FULL_SIZES if args.full else DEFAULT_SIZES)
    return args


def run_fixed(work: Path, tok_dir: str, reps: int) -> None:
    fixed = measure_fixed_cost(work, tok_dir, reps)
    common.print_rows(fixed)
    common.write_result("bench_prep_fixed", "Prep's fixed cost: a whole lmforge prep process on a tiny input", fixed,
                        {"documents": FIXED_DOCS, "reps": reps, "cores": len(os.sched_getaffinity(0)),
                         "load_average_1min": round(os.getloadavg()[0], 2), "bytecode": "cached"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.use_this_checkout()
    work = Path(args.work)
    tok_dir = build_tokenizer(work)
    if args.fixed_only or not args.full:
        run_fixed(work, tok_dir, args.reps)
    if args.fixed_only:
        return 0
    tag = "(bench-full)" if args.full else ""
    has_datatrove = not args.no_datatrove and importlib.util.find_spec("datatrove") is not None
    settings = []
    for mb in args.sizes:
        for workers in args.workers:
            methods = ["lmforge", "raw", *(["datatrove"] if has_datatrove and mb <= DATATROVE_MAX_MB else []),
                       *(["hf"] if not args.no_hf and mb <= HF_MAX_MB else [])]
            settings.append(measure_setting(work, tok_dir, mb, workers, methods, args.reps))
    rows = [r for s in settings for r in setting_rows(s, tag)] + fit_rows(settings, tag)
    details: dict = {"sizes_mb": list(args.sizes), "workers": list(args.workers), "reps": args.reps, "seq_len": SEQ_LEN,
                     "vocab_size": VOCAB, "tokenizer": tok_dir, "cores": len(os.sched_getaffinity(0)),
                     "datatrove": has_datatrove, "hf_max_mb": HF_MAX_MB, "datatrove_max_mb": DATATROVE_MAX_MB,
                     "mode": "bench-full" if args.full else "bench", "settings": settings}
    if not args.skip_memory and not args.full:
        mem_rows, details["memory_runs"] = memory_rows(work, tok_dir, settings, max(args.workers))
        rows += mem_rows
    common.print_rows(rows)
    print(f"(1-minute load average {os.getloadavg()[0]:.1f} on {details['cores']} cores: other processes inflate the "
          "wall times; the CPU-time rows are less sensitive to them)")
    name = "bench_prep_full" if args.full else "bench_prep"
    title = ("Prep (bench-full): lmforge prep vs raw tokenizers encode_batch_fast, datatrove and datasets, by corpus size"
             if args.full else "Prep: lmforge prep vs raw tokenizers encode_batch_fast, datatrove and datasets")
    common.write_result(name, title, rows, details, copy_to=args.json)
    unequal = [f"{s['jsonl_mb']} MB, {s['workers']} worker(s)" for s in settings if not s["streams_equal"]]
    if unequal:
        print(f"FAILED: lmforge's packed token stream differs from a peer's at {'; '.join(unequal)} "
              "(digests in the result's details.settings[].streams)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
