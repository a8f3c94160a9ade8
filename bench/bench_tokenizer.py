"""Tokenizer training: lmforge against the raw ``tokenizers`` trainer, and its memory under a byte budget.

The corpus is the Python standard library (``common.stdlib_texts``, about 31.5 MB of text) written
once as 4 jsonl shards under ``bench/.cache`` (documents dealt round robin), so the reader parses
JSON as it would on a real corpus. Nothing is downloaded.

1. Throughput. In one process, alternating (``common.alternate``), ``--rounds`` times:
   ``train_tokenizer`` end to end (read + parse jsonl, stream batches, train, save the folder,
   reload it with AutoTokenizer) against ``Tokenizer.train_from_iterator`` of the same family's
   components on an in-memory list of the same documents (loaded before the clock starts; imports
   too). Rows: MB/s of text (ratio = raw seconds / lmforge seconds; target (issue 4) >= 0.9x) and
   CPU seconds (user + system, all threads: steadier than wall time on a shared machine).
2. Memory. Fresh processes, peak RSS (``VmHWM``), alternating, ``--rounds`` times: lmforge with
   ``--max-bytes`` (default: corpus / 5, so the corpus is 5x the budget) against the raw trainer
   holding that same sample in a list; then lmforge on the whole corpus once, for reference. Every
   process imports transformers' AutoTokenizer (and so torch, about 250 MB) before its baseline is
   read. lmforge passes when its RSS growth above the baseline is at most 1.1x the raw trainer's
   (what training on ``max_bytes`` of text needs anyway: the text plus the trainer's words and
   pairs; RSS noise is ~3%), i.e. the corpus beyond the budget costs no memory: ratio >= 0.909x.

Usage: ``python bench/bench_tokenizer.py [--family byte-bpe] [--vocab-size 8192] [--rounds 3]
[--max-bytes B] [--out FILE]``; writes ``bench/results/bench_tokenizer.json`` (and a copy to
``--out`` when given). ``--child`` is the entry point of one memory measurement.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

RSS_TOLERANCE = 1.1
"""lmforge may grow at most 10% more than the raw trainer holding the budget's text (RSS noise is ~3%)."""
SHARDS = 4
CORPUS_DIR = common.CACHE_DIR / f"stdlib-jsonl{SHARDS}"


def corpus() -> tuple[Path, int]:
    """``(folder of the jsonl shards, text bytes)``, written once under ``bench/.cache``."""
    def build(tmp: Path) -> None:
        texts = common.stdlib_texts()
        total = sum(common.write_jsonl(tmp / f"part-{i}.jsonl", texts[i::SHARDS]) for i in range(SHARDS))
        (tmp / "corpus.json").write_text(json.dumps({"text_bytes": total, "documents": len(texts)}))

    folder = common.cached_build(CORPUS_DIR, build)
    return folder, json.loads((folder / "corpus.json").read_text())["text_bytes"]


def _status_bytes(field: str) -> int:
    """A size field of /proc/self/status in bytes: ``VmRSS`` (now) or ``VmHWM`` (peak since exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _config(corpus_dir: Path, out: Path, family: str, vocab_size: int, max_bytes: int | None):
    from data_prep.tokenizer.train import TokenizerTrainConfig

    return TokenizerTrainConfig(inputs=[str(corpus_dir)], output=str(out), family=family, vocab_size=vocab_size,
                                max_bytes=max_bytes)


def _raw_train(texts: list[str], family: str, vocab_size: int) -> Any:
    """The peer: the family's tokenizers components, trained from an in-memory list."""
    from data_prep.tokenizer.families import FAMILIES, build, special_token_problems

    spec = FAMILIES[family]
    specials, _ = special_token_problems(spec, {}, [])
    assert specials is not None  # the family's defaults are valid
    tok, trainer = build(spec, specials, vocab_size, 2)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def throughput(corpus_dir: Path, work: Path, args) -> tuple[dict, dict]:
    """``(wall runs, details)``: alternating timed trainings of both sides in this process."""
    from transformers import AutoTokenizer  # noqa: F401  (one-time imports, torch included, before any clock)

    from data_prep.reader import iter_documents
    from data_prep.tokenizer.train import train_tokenizer

    texts = [d.text for d in iter_documents([str(corpus_dir)])]
    cpu: dict[str, list[float]] = {"lmforge": [], "peer": []}
    last: dict[str, Any] = {}

    def measure(side: str) -> float:
        cpu0, start = common.cpu_seconds(), time.perf_counter()
        if side == "lmforge":
            last["info"] = train_tokenizer(_config(corpus_dir, work / "tok", args.family, args.vocab_size, None))
        else:
            last["raw"] = _raw_train(texts, args.family, args.vocab_size)
        wall = time.perf_counter() - start
        cpu[side].append(common.cpu_seconds() - cpu0)
        return wall

    wall = common.alternate({"lmforge": lambda: measure("lmforge"), "peer": lambda: measure("peer")}, args.rounds)
    raw = last["raw"]
    same_model = json.loads(raw.to_str())["model"] == json.loads((work / "tok" / "tokenizer.json").read_text())["model"]
    return {"wall": wall, "cpu": cpu}, {"documents": len(texts), "wall_seconds": wall, "cpu_seconds": cpu,
                                        "same_vocab_size": last["info"].vocab_size == raw.get_vocab_size(),
                                        "same_model": same_model}


def _child(mode: str, corpus_dir: str, out: str, max_bytes: int, family: str, vocab_size: int) -> None:
    """One memory measurement in a fresh process; prints a :func:`common.result_line`."""
    import tokenizers  # noqa: F401  (fixed costs, in the baseline of every mode: AutoTokenizer imports torch,
    from transformers import AutoTokenizer  # noqa: F401  about 250 MB, whatever the corpus size)

    from data_prep.tokenizer.corpus import CorpusStats, CorpusText
    from data_prep.tokenizer.train import train_tokenizer

    baseline = _status_bytes("VmRSS")
    result = {"mode": mode, "baseline_rss": baseline}
    if mode == "raw-sample":
        stats = CorpusStats()
        texts = [t for batch in CorpusText([corpus_dir], max_bytes=max_bytes).batches(stats) for t in batch]
        _raw_train(texts, family, vocab_size)
        result["text_bytes"] = stats.text_bytes
    else:
        budget = max_bytes if mode == "lmforge-budget" else None
        train_tokenizer(_config(Path(corpus_dir), Path(out), family, vocab_size, budget))
        meta = json.loads((Path(out) / "lmforge_tokenizer.json").read_text())
        result["text_bytes"] = meta["text_bytes"]
    result["peak_rss"] = _status_bytes("VmHWM")  # getrusage's ru_maxrss would carry the parent's peak across exec
    print(common.result_line(result), flush=True)


def memory_run(mode: str, corpus_dir: Path, work: Path, max_bytes: int, args) -> dict:
    """One fresh-process memory measurement (see :func:`_child`)."""
    out = work / mode
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(corpus_dir), str(out), str(max_bytes),
           args.family, str(args.vocab_size)]
    run = common.parse_result(common.run_child(cmd, env=common.python_env()), f"memory run {mode}")
    print(f"    {mode}: peak RSS {run['peak_rss'] / 2**20:.0f} MiB (baseline {run['baseline_rss'] / 2**20:.0f} MiB), "
          f"text {run['text_bytes'] / 1e6:.1f} MB", flush=True)
    return run


def memory(corpus_dir: Path, work: Path, corpus_bytes: int, args) -> dict:
    """Alternating budget runs of both sides, then one unbudgeted lmforge run; every run a fresh process."""
    max_bytes = args.max_bytes or corpus_bytes // 5
    runs: dict[str, list[dict]] = {"lmforge": [], "peer": []}

    def growth_mib(side: str, mode: str) -> float:
        run = memory_run(mode, corpus_dir, work, max_bytes, args)
        runs[side].append(run)
        return (run["peak_rss"] - run["baseline_rss"]) / 2**20

    growth = common.alternate({"lmforge": lambda: growth_mib("lmforge", "lmforge-budget"),
                               "peer": lambda: growth_mib("peer", "raw-sample")}, args.rounds)
    full = memory_run("lmforge-full", corpus_dir, work, max_bytes, args)
    return {"max_bytes": max_bytes, "corpus_to_budget": corpus_bytes / max_bytes, "growth_mib": growth,
            "runs": runs, "lmforge_full": full,
            "budget_honoured": all(r["text_bytes"] <= max_bytes for r in runs["lmforge"])}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        mode, child_corpus, out, max_bytes, family, vocab = argv[1:7]
        common.use_this_checkout()
        _child(mode, child_corpus, out, int(max_bytes), family, int(vocab))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="byte-bpe")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=common.MIN_REPEATS, help="alternating rounds of each part (>= 3)")
    p.add_argument("--max-bytes", type=int, default=None, help="memory run budget in bytes (default: corpus / 5)")
    p.add_argument("--out", default=None, help="also write the result JSON here")
    args = p.parse_args(argv)
    common.use_this_checkout()
    logging.basicConfig(level=logging.WARNING)
    corpus_dir, corpus_bytes = corpus()
    print(f"corpus: {corpus_bytes / 1e6:.1f} MB of stdlib text in {SHARDS} jsonl shards; family {args.family}, "
          f"vocab {args.vocab_size}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lmforge-tokbench-") as tmp:
        work_dir = Path(tmp)
        print("throughput (lmforge end to end vs raw trainer on an in-memory list):", flush=True)
        times, t_details = throughput(corpus_dir, work_dir, args)
        print("memory (fresh processes):", flush=True)
        mem = memory(corpus_dir, work_dir, corpus_bytes, args)

    peer = "tokenizers train_from_iterator, in-memory list"
    mb_per_s = {side: [corpus_bytes / 1e6 / s for s in runs] for side, runs in times["wall"].items()}
    budget_mb, factor = mem["max_bytes"] / 1e6, mem["corpus_to_budget"]
    peaks = {side: [r["peak_rss"] / 2**20 for r in runs] for side, runs in mem["runs"].items()}
    rows = [
        common.row(f"training throughput ({args.family}, vocab {args.vocab_size})", "MB/s", mb_per_s["lmforge"],
                   mb_per_s["peer"], peer, target=">= 0.9x",
                   note="lmforge end to end: read + parse jsonl, train, save, reload"),
        common.row("training CPU time", "CPU s", times["cpu"]["lmforge"], times["cpu"]["peer"], peer, better="lower",
                   note="user + system, all threads; steadier than wall time on a shared machine"),
        common.row(f"RSS growth, --max-bytes {budget_mb:.1f} MB on a {factor:.1f}x corpus", "MiB",
                   mem["growth_mib"]["lmforge"], mem["growth_mib"]["peer"], "raw trainer holding the budget's text",
                   better="lower", target=f">= {1 / RSS_TOLERANCE:.3f}x",
                   note=f"within the byte budget: growth <= {RSS_TOLERANCE}x the raw trainer's on the same sample"),
        common.row(f"peak RSS, --max-bytes {budget_mb:.1f} MB on a {factor:.1f}x corpus", "MiB", peaks["lmforge"],
                   peaks["peer"], "raw trainer holding the budget's text", better="lower",
                   note="both import transformers and torch first (~250 MB)"),
        common.row("peak RSS, whole corpus, no budget", "MiB", mem["lmforge_full"]["peak_rss"] / 2**20,
                   note=f"{corpus_bytes / 1e6:.1f} MB of text"),
    ]
    common.print_rows(rows)
    throughput_ratio, rss_ratio = rows[0]["ratio"], rows[2]["ratio"]
    print(f"throughput ratio {throughput_ratio:.3f} (target >= 0.9: {'PASS' if throughput_ratio >= 0.9 else 'FAIL'}); "
          f"CPU time ratio {rows[1]['ratio']:.3f}; same model as the raw trainer: {t_details['same_model']}")
    print(f"RSS growth ratio {rss_ratio:.3f} with budget {budget_mb:.1f} MB on a {factor:.1f}x corpus "
          f"(target >= {1 / RSS_TOLERANCE:.3f}: {'PASS' if rss_ratio >= 1 / RSS_TOLERANCE else 'FAIL'}); "
          f"text budget honoured: {mem['budget_honoured']}")
    details = {"family": args.family, "vocab_size": args.vocab_size, "rounds": args.rounds, "corpus_text_bytes": corpus_bytes,
               "throughput": t_details, "memory": mem, "rss_tolerance": RSS_TOLERANCE}
    common.write_result("bench_tokenizer", "Tokenizer training vs the raw tokenizers trainer; memory under a byte budget",
                        rows, details, copy_to=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
