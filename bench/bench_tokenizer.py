"""Benchmark: lmforge tokenizer training against the raw ``tokenizers`` trainer, and its memory under a byte budget.

Run from the repository root (nothing is downloaded; the corpus is the Python standard library,
written as jsonl shards so the reader parses JSON as it would on a real corpus):

    PYTHONPATH=. python bench/tokenizer_train.py [--family byte-bpe] [--vocab-size 8192] [--rounds 3]

1. Throughput. In one process, alternating, ``--rounds`` times: ``train_tokenizer`` end to end
   (read + parse jsonl, stream batches, train, save the folder, reload it with AutoTokenizer)
   against ``Tokenizer.train_from_iterator`` of the same family's components on an in-memory
   list of the same documents (loaded before the clock starts; imports too). Reported: median seconds each,
   MB/s, ``throughput_ratio`` = raw seconds / lmforge seconds (target >= 0.9), and the same ratio
   of CPU seconds (steadier than wall time on a shared machine; the load average is recorded).
2. Memory. Fresh processes, peak RSS (``VmHWM``): lmforge with ``--max-bytes`` on a corpus
   at least 4x larger, the raw trainer holding that same sample in a list, and lmforge on the
   whole corpus; every process imports transformers' AutoTokenizer (and so torch, about 250 MB)
   before its baseline is read. ``rss_budget`` = lmforge's baseline + 1.1 x the raw trainer's RSS
   growth with the budget's text held in a list (what training on ``max_bytes`` of text needs
   anyway: the text plus the trainer's words and pairs). lmforge passes when its peak on the larger
   corpus stays within that, i.e. the corpus beyond the budget costs no memory. Reported:
   peak RSS of each, pass/fail, RSS above baseline per budget byte, kept text bytes (<= max_bytes).

Writes the results as JSON (``--out``) and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_TOLERANCE = 1.1
"""lmforge may grow at most 10% more than the raw trainer holding the budget's text (RSS noise is ~3%)."""
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status_bytes(field: str) -> int:
    """A size field of /proc/self/status in bytes: ``VmRSS`` (now) or ``VmHWM`` (peak since exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (tokenizers' Rust pool included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_corpus(folder: Path, shards: int = 4) -> int:
    """The stdlib as ``shards`` jsonl files (documents dealt round robin); returns the text bytes."""
    from data_prep.reader import iter_documents

    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"part-{i}.jsonl", "w", encoding="utf-8") for i in range(shards)]
    total = 0
    for n, doc in enumerate(iter_documents(["stdlib"])):
        try:
            total += len(doc.text.encode("utf-8"))
        except UnicodeEncodeError:
            continue
        handles[n % shards].write(json.dumps({"text": doc.text}) + "\n")
    for h in handles:
        h.close()
    return total


def _config(corpus: Path, out: Path, args, max_bytes: int | None):
    from data_prep.tokenizer_train import TokenizerTrainConfig

    return TokenizerTrainConfig(inputs=[str(corpus)], output=str(out), family=args.family, vocab_size=args.vocab_size,
                                max_bytes=max_bytes)


def _raw_train(texts: list[str], args) -> object:
    """The peer: the family's tokenizers components, trained from an in-memory list."""
    from data_prep.tokenizer_families import FAMILIES, build, special_token_problems

    spec = FAMILIES[args.family]
    specials, _ = special_token_problems(spec, {}, [])
    tok, trainer = build(spec, specials, args.vocab_size, 2)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def throughput(corpus: Path, work: Path, args) -> dict:
    from data_prep.reader import iter_documents
    from data_prep.tokenizer_train import train_tokenizer

    from transformers import AutoTokenizer  # noqa: F401  (one-time imports, torch included, before any clock)

    texts = [d.text for d in iter_documents([str(corpus)])]
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    wall = {"lmforge": [], "raw": []}
    cpu = {"lmforge": [], "raw": []}
    for r in range(args.rounds):
        for side in (("lmforge", "raw") if r % 2 == 0 else ("raw", "lmforge")):
            cpu0, start = _cpu_seconds(), time.perf_counter()
            if side == "lmforge":
                info = train_tokenizer(_config(corpus, work / "tok", args, None))
            else:
                tok = _raw_train(texts, args)
            wall[side].append(time.perf_counter() - start)
            cpu[side].append(_cpu_seconds() - cpu0)
        print(f"  round {r + 1}: lmforge {wall['lmforge'][-1]:.2f} s ({cpu['lmforge'][-1]:.2f} s CPU), "
              f"raw {wall['raw'][-1]:.2f} s ({cpu['raw'][-1]:.2f} s CPU)", flush=True)
    lm, raw = statistics.median(wall["lmforge"]), statistics.median(wall["raw"])
    lm_cpu, raw_cpu = statistics.median(cpu["lmforge"]), statistics.median(cpu["raw"])
    return {"text_bytes": text_bytes, "documents": len(texts), "rounds": args.rounds,
            "wall_seconds": wall, "cpu_seconds": cpu, "lmforge_median_s": lm, "raw_median_s": raw,
            "lmforge_mb_per_s": text_bytes / lm / 1e6, "raw_mb_per_s": text_bytes / raw / 1e6,
            "throughput_ratio": raw / lm, "cpu_time_ratio": raw_cpu / lm_cpu, "target_ratio": 0.9,
            "passed": raw / lm >= 0.9, "same_vocab_size": info.vocab_size == tok.get_vocab_size(),
            "same_model": json.loads(tok.to_str())["model"] == json.loads((work / "tok" / "tokenizer.json").read_text())["model"],
            "load_average_after": os.getloadavg()}


def _child(mode: str, corpus: str, out: str, max_bytes: int, family: str, vocab_size: int) -> None:
    """One memory measurement in a fresh process; prints a JSON line."""
    args = argparse.Namespace(family=family, vocab_size=vocab_size)
    import tokenizers  # noqa: F401  (fixed costs, in the baseline of every mode: AutoTokenizer imports torch,
    from transformers import AutoTokenizer  # noqa: F401  about 250 MB, whatever the corpus size)

    from data_prep.tokenizer_corpus import CorpusStats, CorpusText
    from data_prep.tokenizer_train import train_tokenizer

    baseline = _status_bytes("VmRSS")
    result = {"mode": mode, "baseline_rss": baseline}
    if mode == "raw-sample":
        stats = CorpusStats()
        texts = [t for batch in CorpusText([corpus], max_bytes=max_bytes).batches(stats) for t in batch]
        _raw_train(texts, args)
        result["text_bytes"] = stats.text_bytes
    else:
        budget = max_bytes if mode == "lmforge-budget" else None
        train_tokenizer(_config(Path(corpus), Path(out), args, budget))
        meta = json.loads((Path(out) / "lmforge_tokenizer.json").read_text())
        result["text_bytes"] = meta["text_bytes"]
    result["peak_rss"] = _status_bytes("VmHWM")  # getrusage's ru_maxrss would carry the parent's peak across exec
    print(json.dumps(result))


def memory(corpus: Path, work: Path, corpus_bytes: int, args) -> dict:
    max_bytes = args.max_bytes or corpus_bytes // 5
    runs = {}
    for mode in ("lmforge-budget", "raw-sample", "lmforge-full"):
        cmd = [sys.executable, __file__, "--child", mode, str(corpus), str(work / mode), str(max_bytes), args.family,
               str(args.vocab_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {mode}: peak RSS {runs[mode]['peak_rss'] / 2**20:.0f} MiB "
              f"(baseline {runs[mode]['baseline_rss'] / 2**20:.0f} MiB), text {runs[mode]['text_bytes'] / 1e6:.1f} MB", flush=True)
    ours, peer = runs["lmforge-budget"], runs["raw-sample"]
    budget = ours["baseline_rss"] + int(RSS_TOLERANCE * (peer["peak_rss"] - peer["baseline_rss"]))
    return {"corpus_text_bytes": corpus_bytes, "max_bytes": max_bytes, "corpus_to_budget": corpus_bytes / max_bytes,
            "runs": runs, "rss_budget": budget, "within_budget": ours["peak_rss"] <= budget,
            "budget_honoured": ours["text_bytes"] <= max_bytes,
            "rss_above_baseline_per_budget_byte": (ours["peak_rss"] - ours["baseline_rss"]) / max_bytes}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, corpus, out, max_bytes, family, vocab = sys.argv[2:8]
        _child(mode, corpus, out, int(max_bytes), family, int(vocab))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="byte-bpe")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-bytes", type=int, default=None, help="memory run budget (default: corpus / 5)")
    p.add_argument("--out", default="runs/bench/tokenizer_train.json", help="results JSON (runs/ is git-ignored)")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lmforge-tokbench-") as tmp:
        work = Path(tmp)
        corpus_bytes = write_corpus(work / "corpus")
        print(f"corpus: {corpus_bytes / 1e6:.1f} MB of stdlib text in jsonl; family {args.family}, vocab {args.vocab_size}")
        print("throughput (lmforge end to end vs raw trainer on an in-memory list):")
        result = {"family": args.family, "vocab_size": args.vocab_size, "cpus": os.cpu_count(),
                  "throughput": throughput(work / "corpus", work, args)}
        print("memory (fresh processes):")
        result["memory"] = memory(work / "corpus", work, corpus_bytes, args)
    t, m = result["throughput"], result["memory"]
    print(f"throughput ratio {t['throughput_ratio']:.3f} (target >= 0.9: {'PASS' if t['passed'] else 'FAIL'}); "
          f"lmforge {t['lmforge_mb_per_s']:.2f} MB/s, raw {t['raw_mb_per_s']:.2f} MB/s")
    print(f"peak RSS {m['runs']['lmforge-budget']['peak_rss'] / 2**20:.0f} MiB with budget {m['max_bytes'] / 1e6:.1f} MB on "
          f"{m['corpus_to_budget']:.1f}x corpus; RSS budget {m['rss_budget'] / 2**20:.0f} MiB: "
          f"{'PASS' if m['within_budget'] else 'FAIL'}; text budget honoured: {m['budget_honoured']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
