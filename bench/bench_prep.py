"""Prep throughput and memory: lmforge prep against raw ``tokenizers`` and the ``datasets`` pipeline.

Setting (issue 3): the Python standard library as a jsonl corpus (about 31.5 MB of text, one
document per file), a 16k byte-level BPE trained on it, every core of this machine.

Measured side by side, alternating, each trial in a fresh process, median of ``--reps``:

- ``raw``: ``tokenizers.Tokenizer.encode_batch`` over the texts, already in memory (only the call is
  timed);
- ``lmforge``: ``data_prep.prep.prepare`` end to end: read the jsonl, tokenize, pack, write shards,
  merge, manifest;
- ``hf``: the Hugging Face ``run_clm.py`` pipeline: ``load_dataset("json")``, then
  ``map(tokenize, batched=True, num_proc)`` and ``map(group_texts, batched=True, num_proc)``,
  with a fresh cache folder.

Throughput ratios are ``t_peer / t_lmforge`` over the same texts (targets: >= 0.95 against raw,
>= 1.3 against hf), in wall time and, less sensitive to other load on the machine, in CPU time
(user + system, worker processes included). Peak RSS is the largest sum over the process tree (main + workers), sampled
every 20 ms (PSS, so pages shared with forked workers count once), for lmforge on the corpus and on 4 copies of it (target: <= 1.5 GB and flat), and
on one 50 MB single-line document.

Usage: ``python bench/prep_throughput.py [--work runs/bench_prep] [--reps 3] [--json out.json]``
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 1024
VOCAB = 16384


def _write_corpus(work: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from data_prep.reader import iter_documents

    texts = [d.text for d in iter_documents(["stdlib"])]
    paths = {"1x": work / "corpus.jsonl", "4x": work / "corpus4x.jsonl", "doc50mb": work / "doc50mb.jsonl"}
    if not all(p.exists() for p in paths.values()):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        paths["1x"].write_text(lines)
        paths["4x"].write_text(lines * 4)
        big = "".join(texts)
        big = (big * (50_000_000 // len(big) + 1))[:50_000_000]
        paths["doc50mb"].write_text(json.dumps({"text": big}) + "\n")
    return {k: str(v) for k, v in paths.items()}


def _train_tokenizer(work: Path, corpus: str) -> str:
    tok = work / "tok16k"
    if not (tok / "tokenizer.json").exists():
        sys.path.insert(0, str(ROOT))
        from data_prep.tokenizer import train_byte_bpe

        train_byte_bpe([corpus], tok, vocab_size=VOCAB, model_max_length=SEQ_LEN)
    return str(tok)


# ---------------------------------------------------------------- children (one trial each)

def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (worker pools)."""
    import resource

    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def _child_raw(corpus: str, tok_dir: str, out: str) -> dict:
    from tokenizers import Tokenizer

    with open(corpus, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    cpu, start = _cpu_seconds(), time.perf_counter()
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"seconds": elapsed, "cpu_seconds": cpu, "tokens": sum(len(e.ids) for e in encodings)}


def _child_lmforge(corpus: str, tok_dir: str, out: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from data_prep.prep import PrepConfig, prepare
    from data_prep.tokenizer import load_tokenizer_info

    load_tokenizer_info(tok_dir)  # imports transformers and torch: start-up, kept off the clock as for the peers

    cpu, start = _cpu_seconds(), time.perf_counter()
    manifest = prepare(PrepConfig(inputs=[corpus], tokenizer=tok_dir, output=out, seq_len=SEQ_LEN, overwrite=True,
                                  show_progress=False))
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"seconds": elapsed, "cpu_seconds": cpu, "tokens": manifest["counts"]["tokens"]}


def _child_hf(corpus: str, tok_dir: str, out: str) -> dict:
    import shutil
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

    cpu, start = _cpu_seconds(), time.perf_counter()
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=out)
    ds = ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])
    ds = ds.map(group_texts, batched=True, num_proc=num_proc)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"seconds": elapsed, "cpu_seconds": cpu, "tokens": len(ds) * SEQ_LEN, "sequences": len(ds)}


CHILDREN = {"raw": _child_raw, "lmforge": _child_lmforge, "hf": _child_hf}


# ---------------------------------------------------------------- parent

def _run_child(method: str, corpus: str, tok_dir: str, out: str) -> dict:
    """Run one trial in a fresh process; add the peak memory (bytes) of its whole process tree.

    Memory is the sum of PSS (proportional set size: pages shared by forked workers counted
    once in all) where Linux reports it, else of RSS.
    """
    import psutil

    proc = psutil.Popen([sys.executable, __file__, "--child", method, corpus, tok_dir, out], stdout=subprocess.PIPE, text=True)
    peak = 0

    def used(p: psutil.Process) -> int:
        try:
            return p.memory_full_info().pss
        except (AttributeError, psutil.AccessDenied):
            return p.memory_info().rss

    while proc.poll() is None:
        try:
            peak = max(peak, sum(used(p) for p in [proc] + proc.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} trial failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_bytes"] = peak
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_prep"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None, help="result file (default WORK/prep_throughput.json)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 4x corpus and 50 MB document runs")
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "CORPUS", "TOKENIZER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, corpus, tok_dir, out = args.child
        print(json.dumps(CHILDREN[method](corpus, tok_dir, out)))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = _write_corpus(work)
    tok_dir = _train_tokenizer(work, corpus["1x"])
    mb = os.path.getsize(corpus["1x"]) / 1e6
    print(f"corpus {mb:.1f} MB jsonl, tokenizer {VOCAB} byte-level BPE, seq_len {SEQ_LEN}, {len(os.sched_getaffinity(0))} cores")
    trials: dict[str, list[dict]] = {m: [] for m in CHILDREN}
    for rep in range(args.reps):
        for method in CHILDREN:  # alternate, so drifting machine load hits every method alike
            r = _run_child(method, corpus["1x"], tok_dir, str(work / f"out_{method}"))
            trials[method].append(r)
            print(f"  rep {rep + 1} {method:8s} {r['seconds']:7.2f} s  ({r['cpu_seconds']:6.2f} CPU s)  "
                  f"peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB", flush=True)
    median = {m: statistics.median(t["seconds"] for t in ts) for m, ts in trials.items()}
    median_cpu = {m: statistics.median(t["cpu_seconds"] for t in ts) for m, ts in trials.items()}
    results = {
        "corpus_mb": round(mb, 2), "seq_len": SEQ_LEN, "vocab_size": VOCAB, "cores": len(os.sched_getaffinity(0)),
        "median_seconds": median, "median_cpu_seconds": median_cpu, "trials": trials,
        "ratio_vs_raw_encode_batch": median["raw"] / median["lmforge"],
        "ratio_vs_datasets_map": median["hf"] / median["lmforge"],
        "cpu_ratio_vs_raw_encode_batch": median_cpu["raw"] / median_cpu["lmforge"],
        "cpu_ratio_vs_datasets_map": median_cpu["hf"] / median_cpu["lmforge"],
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print(f"lmforge prep vs raw tokenizers encode_batch: {results['ratio_vs_raw_encode_batch']:.2f}x wall time (target >= 0.95), "
          f"{results['cpu_ratio_vs_raw_encode_batch']:.2f}x CPU time")
    print(f"lmforge prep vs datasets.map + group_texts:  {results['ratio_vs_datasets_map']:.2f}x wall time (target >= 1.3), "
          f"{results['cpu_ratio_vs_datasets_map']:.2f}x CPU time")
    print(f"(1-minute load average {results['load_average_1min_at_end']:.1f} on {results['cores']} cores: "
          "other processes inflate the wall times; the CPU-time ratios are less sensitive to them)")
    if not args.skip_memory:
        peaks = {"1x": max(t["peak_rss_bytes"] for t in trials["lmforge"])}
        for name in ("4x", "doc50mb"):
            r = _run_child("lmforge", corpus[name], tok_dir, str(work / f"out_{name}"))
            peaks[name] = r["peak_rss_bytes"]
            print(f"  lmforge {name:8s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB", flush=True)
        results["peak_rss_mib"] = {k: round(v / 2**20) for k, v in peaks.items()}
        results["rss_4x_over_1x"] = peaks["4x"] / peaks["1x"]
        print(f"peak RSS (process tree): 1x {peaks['1x'] / 2**20:.0f} MiB, 4x {peaks['4x'] / 2**20:.0f} MiB "
              f"({results['rss_4x_over_1x']:.2f}x), one 50 MB document {peaks['doc50mb'] / 2**20:.0f} MiB (target <= 1536, flat)")
    path = Path(args.json or work / "prep_throughput.json")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
