"""Shared helpers of the ``bench/`` scripts: alternating timed runs, child processes with their peak
RSS, the prepared bench data, and the result JSON that ``bench/report.py`` turns into BENCHMARKS.md.

Every bench script measures lmforge and its peer side by side in one run on the same input: the
sides alternate (A B A B A B, so a load spike on the shared machine hits both), each at least
:data:`MIN_REPEATS` times, and the median is kept.

Result JSON (``bench/results/<name>.json``), written by :func:`write_result`::

    {"name": "bench_loader", "title": "...", "date": "2026-...Z", "commit": "0123456789ab", "machine": {...},
     "versions": {...},
     "rows": [{"metric": "loader throughput", "unit": "tokens/s", "lmforge": 1.2e6,
               "peer": 3.4e5, "peer_name": "datasets IterableDataset + DataLoader",
               "ratio": 3.5, "better": "higher", "target": ">= 1.0x", "runs": {"lmforge": [...], "peer": [...]}}],
     "details": {...}}

``ratio`` is lmforge / peer for ``better == "higher"`` and peer / lmforge for ``"lower"``, so a
ratio above 1 always means lmforge wins. Rows without a peer (``peer`` null) are reference figures.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"
"""Bench inputs built once (tokenizer, prepared data); git-ignored."""
MIN_REPEATS = 3
LIBRARIES = ("torch", "deepspeed", "transformers", "accelerate", "datasets", "tokenizers", "pyarrow", "numpy")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def alternate(sides: dict[str, Callable[[], float]], repeats: int = MIN_REPEATS) -> dict[str, list[float]]:
    """Call each side once per round, in turn, for ``repeats`` rounds; returns each side's measurements.

    Each callable returns one measurement (seconds, tokens/s, ...). ``repeats`` below
    :data:`MIN_REPEATS` is raised to it.
    """
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(max(repeats, MIN_REPEATS)):
        for name, measure in sides.items():
            value = measure()
            runs[name].append(value)
            print(f"  round {round_index + 1}: {name:>8} {value:,.4g}", flush=True)
    return runs


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    """Largest resident set of the child or of any descendant it waited for (``wait4`` ru_maxrss)."""
    output: str
    """Combined stdout and stderr (last 20,000 characters)."""


def run_child(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
              timeout_s: float | None = None) -> ChildResult:
    """Run ``cmd`` to completion, capturing its output, wall time and peak RSS.

    Raises:
        subprocess.TimeoutExpired: it ran past ``timeout_s`` (the child is killed first).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env={**os.environ, **(env or {})}, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = None if timeout_s is None else start + timeout_s
    chunks: list[bytes] = []
    assert proc.stdout is not None  # stdout=PIPE
    try:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                if deadline is not None and time.perf_counter() > deadline:
                    raise subprocess.TimeoutExpired(list(cmd), float(timeout_s or 0))
                if sel.select(timeout=0.5):
                    data = os.read(proc.stdout.fileno(), 1 << 16)
                    if not data:
                        break
                    chunks.append(data)
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = b"".join(chunks).decode("utf-8", "replace")[-20000:]
    return ChildResult(proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024, output)


def cpu_seconds(include_children: bool = False) -> float:
    """User + system CPU seconds of this process, all its threads (a Rust or torch thread pool included);
    with ``include_children``, plus those of its finished and waited-for child processes (worker pools)."""
    import resource

    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if include_children else (resource.RUSAGE_SELF,)
    return sum(getattr(resource.getrusage(w), f) for w in who for f in ("ru_utime", "ru_stime"))


RESULT_PREFIX = "BENCH-RESULT "
"""Marks the line carrying a bench child's measurements in its combined output."""


def result_line(payload: dict) -> str:
    """The line a bench child prints for its parent: :data:`RESULT_PREFIX` and ``payload`` as JSON."""
    return RESULT_PREFIX + json.dumps(payload)


def parse_result(result: ChildResult, what: str) -> dict:
    """The payload of the last :func:`result_line` in a child's output.

    Raises:
        RuntimeError: the child failed or printed no result line (its output included).
    """
    check_child(result, what)
    for line in reversed(result.output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{what} printed no result line:\n{result.output[-4000:]}")


def cached_build(folder: Path, build: Callable[[Path], None]) -> Path:
    """``folder``, built once: ``build(tmp)`` fills a fresh temp sibling, which is then renamed to ``folder``,
    so an interrupted build leaves nothing that looks complete and the next run redoes it."""
    import shutil

    if folder.is_dir():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    os.replace(tmp, folder)
    return folder


def stdlib_texts() -> list[str]:
    """The documents of the demo corpus (the Python standard library, one per file; ~31.5 MB of text)
    that encode as UTF-8 (a few hold lone surrogates), in reader order."""
    use_this_checkout()
    from data_prep.reader import iter_documents

    texts = []
    for doc in iter_documents(["stdlib"]):
        try:
            doc.text.encode("utf-8")
        except UnicodeEncodeError:
            continue
        texts.append(doc.text)
    return texts


def write_jsonl(path: Path, texts: Sequence[str]) -> int:
    """``texts`` as ``{"text": ...}`` lines in ``path``; returns the text bytes (UTF-8)."""
    with open(path, "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    return sum(len(t.encode("utf-8")) for t in texts)


def python_env(**extra: str) -> dict[str, str]:
    """Environment for child Pythons: this checkout first on ``PYTHONPATH``, plus ``extra``."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else ""), **extra}


def lmforge_cmd(*args: str) -> list[str]:
    """``python -m lmforge ARGS`` with this interpreter."""
    return [sys.executable, "-m", "lmforge", *args]


def check_child(result: ChildResult, what: str) -> None:
    """Raise ``RuntimeError`` with the tail of the output when ``result`` failed."""
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.output[-4000:]}")


def shard_paths(data_dir: Path, split: str = "train") -> list[str]:
    """The split's shard files, from the manifest (format-version independent)."""
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    return [str(data_dir / s["path"]) for s in manifest["splits"][split]["shards"]]


def collate_rows(rows: list[dict], document_masking: bool = True) -> dict:
    """``datasets`` rows (``input_ids``, ``document_starts``) -> the tensors lmforge feeds the model.

    Returns ``input_ids``, ``labels`` and, with ``document_masking``, ``position_ids``, all
    ``(B, T)`` int64 ``torch`` tensors, built by ``pretrain.data.causal_lm_inputs`` so both sides
    of a comparison train on identical inputs.
    """
    import numpy as np
    import torch

    from pretrain.data import MicroBatch
    from pretrain.inputs import causal_lm_inputs

    ids = np.asarray([r["input_ids"] for r in rows], dtype=np.int64)
    mb = MicroBatch(ids, np.arange(len(rows)), [[int(s) for s in r["document_starts"]] for r in rows])
    return {k: torch.from_numpy(v) for k, v in causal_lm_inputs(mb, document_masking).items()}


def use_this_checkout() -> None:
    """Put this checkout first on ``sys.path`` (a bench script may run without ``PYTHONPATH``)."""
    if str(REPO_ROOT) not in sys.path[:1]:
        sys.path.insert(0, str(REPO_ROOT))


CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
"""Environment that keeps torch and DeepSpeed on the CPU, for the CPU comparisons on any machine."""


def steady_tokens_per_s(metrics_path: Path, skip_steps: int = 2) -> float:
    """Tokens/s over the logged windows after step ``skip_steps`` of a ``metrics.jsonl``.

    Each training record holds ``tokens`` (cumulative) and ``tokens_per_s`` over the window since the
    previous record; the result is the windows' tokens over the windows' seconds.

    Raises:
        RuntimeError: no training record after ``skip_steps``.
    """
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    records = [r for r in records if r.get("tokens_per_s")]
    tokens = seconds = 0.0
    previous = None
    for r in records:
        if previous is not None and r["step"] > skip_steps:
            window = r["tokens"] - previous["tokens"]
            tokens, seconds = tokens + window, seconds + window / r["tokens_per_s"]
        previous = r
    if not seconds:
        raise RuntimeError(f"{metrics_path}: no training record after step {skip_steps}")
    return tokens / seconds


def lmforge_train(tok: Path, data: Path, run_dir: Path, nproc: int, steps: int, overrides: Sequence[str] = (),
                  skip_steps: int = 2, cpu_only: bool = True) -> dict:
    """Train the demo config (``pretrain/configs/demo.yaml``) for ``steps`` steps on ``nproc`` ranks.

    One rank runs ``lmforge train``; more run under ``lmforge launch local``. Logged every
    ``skip_steps`` steps (each record costs an all-reduce, so not every step), the first record
    closing the warm-up; returns ``tokens_per_s`` (all ranks together, steady state after
    ``skip_steps``, see :func:`steady_tokens_per_s`), ``wall_s`` and ``peak_rss_bytes``.

    Raises:
        RuntimeError: the run failed (its output included).
    """
    config = REPO_ROOT / "pretrain" / "configs" / "demo.yaml"
    args = [str(config), f"data.path={data}", f"data.tokenizer={tok}", f"run_dir={run_dir}", f"max_steps={steps}",
            f"log_every_steps={skip_steps}", "show_progress=false", "data.eval_batches=1", "checkpoint.resume=never", *overrides]
    cmd = lmforge_cmd("train", *args) if nproc == 1 else lmforge_cmd("launch", "local", "--nproc", str(nproc), *args)
    result = run_child(cmd, env=python_env(**(CPU_ONLY_ENV if cpu_only else {})))
    check_child(result, f"lmforge training on {nproc} rank(s)")
    return {"tokens_per_s": steady_tokens_per_s(Path(run_dir) / "metrics.jsonl", skip_steps), "nproc": nproc,
            "steps": steps, "skip_steps": skip_steps, "wall_s": round(result.wall_s, 2),
            "peak_rss_bytes": result.peak_rss_bytes}


def flops_per_token(model_config, seq_len: int) -> tuple[float, int]:
    """``(training FLOPs per token, parameters)`` of a transformers config (``pretrain.flops``: 6N + 12LHQT).

    The model is built on the meta device: no memory, no initialisation time.
    """
    from pretrain.flops import flops_per_token as fpt
    from pretrain.model import count_parameters

    return fpt(model_config, seq_len), count_parameters(model_config)


def bench_data(name: str = "stdlib", corpus: Sequence[str] = ("stdlib",), vocab_size: int = 8192,
               seq_len: int = 256, prep_args: Sequence[str] = ()) -> tuple[Path, Path]:
    """``(tokenizer_dir, prepared_dir)`` of the bench corpus, built once with the lmforge CLI and cached.

    The default is the demo's input: the Python standard library (~31.5 MB, ~8.6M tokens), a
    byte-level BPE of 8192 tokens, 256-token packed sequences. Built with ``lmforge tokenizer
    train`` and ``lmforge prep`` (about a minute on 2 cores) under ``bench/.cache/<name>``. ``prep_args``:
    more ``lmforge prep`` options (give the cache its own ``name`` when they change the data).
    """
    root = CACHE_DIR / f"{name}-v{vocab_size}-s{seq_len}"
    tok, data = root / "tokenizer", root / "data"
    env = python_env()
    if not (tok / "tokenizer.json").is_file():
        print(f"bench data: training a {vocab_size}-token tokenizer on {' '.join(corpus)} -> {tok}", flush=True)
        check_child(run_child(lmforge_cmd("tokenizer", "train", "--input", *corpus, "--output", str(tok),
                                          "--vocab-size", str(vocab_size)), env=env), "lmforge tokenizer train")
    if not (data / "manifest.json").is_file():
        print(f"bench data: prep at seq_len {seq_len} -> {data}", flush=True)
        check_child(run_child(lmforge_cmd("prep", "--input", *corpus, "--tokenizer", str(tok), "--output", str(data),
                                          "--seq-len", str(seq_len), "--overwrite", *prep_args), env=env), "lmforge prep")
    return tok, data


def machine_info() -> dict:
    """CPU model and count, memory, GPU (when torch sees one), OS and the load average at the start."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def source_commit() -> str | None:
    """The lmforge commit this checkout is at (``git rev-parse --short=12 HEAD``), with ``+uncommitted`` when a
    tracked file other than the results and BENCHMARKS.md differs from it; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short=12", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!BENCHMARKS.md")
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout (an unpacked sdist)
        return None
    return head + ("+uncommitted" if dirty.strip() else "")


def library_versions() -> dict[str, str]:
    """Installed versions of lmforge and of the libraries the benchmarks compare against."""
    out = {}
    for name in ("lmforge", *LIBRARIES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def row(metric: str, unit: str, lmforge: Sequence[float] | float, peer: Sequence[float] | float | None = None,
        peer_name: str = "", better: str = "higher", target: str = "", note: str = "") -> dict:
    """One result row: medians of the runs of both sides and the ratio (above 1 = lmforge wins)."""
    lm_runs = [lmforge] if isinstance(lmforge, (int, float)) else list(lmforge)
    peer_runs = None if peer is None else ([peer] if isinstance(peer, (int, float)) else list(peer))
    lm, pv = median(lm_runs), None if peer_runs is None else median(peer_runs)
    ratio = None
    if pv is not None and lm > 0 and pv > 0:
        ratio = lm / pv if better == "higher" else pv / lm
    return {"metric": metric, "unit": unit, "lmforge": lm, "peer": pv, "peer_name": peer_name, "ratio": ratio,
            "ratio_range": ratio_range(lm_runs, peer_runs, better), "better": better, "target": target, "note": note,
            "runs": {"lmforge": lm_runs, "peer": peer_runs}}


def ratio_range(lm_runs: Sequence[float], peer_runs: Sequence[float] | None, better: str = "higher") -> list[float] | None:
    """``[min, max]`` of the per-round ratios (round i of lmforge against round i of the peer, as
    :func:`alternate` pairs them; above 1 = lmforge wins), or None without at least 2 paired rounds.
    A range that contains 1.0 is a tie: the rounds disagree on which side is faster."""
    if not peer_runs or len(peer_runs) != len(lm_runs) or len(lm_runs) < 2:
        return None
    pairs = [(a, b) for a, b in zip(lm_runs, peer_runs) if a > 0 and b > 0]
    if len(pairs) != len(lm_runs):
        return None
    ratios = [a / b if better == "higher" else b / a for a, b in pairs]
    return [min(ratios), max(ratios)]


def line_fits(xs: Sequence[float], runs_per_x: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """``(a, b)`` of the least-squares line ``y = a + b * x``, one per round: round ``r`` fits
    ``runs_per_x[i][r]`` against ``xs[i]`` (the rounds :func:`alternate` ran at each size), over as many
    rounds as every size has. With two sizes the line passes through both points (no residual).

    Raises:
        ValueError: fewer than two distinct ``xs``.
    """
    import numpy as np

    if len(set(xs)) < 2:
        raise ValueError(f"a line needs two distinct sizes, got {list(xs)}")
    rounds = min(len(runs) for runs in runs_per_x)
    fits = (np.polyfit(list(xs), [runs[r] for runs in runs_per_x], 1) for r in range(rounds))
    return [(float(a), float(b)) for b, a in fits]


def is_tie(ratio_span: Sequence[float] | None) -> bool:
    """True when the per-round ratios of :func:`ratio_range` fall on both sides of 1.0 (or touch it)."""
    return ratio_span is not None and ratio_span[0] <= 1.0 <= ratio_span[1]


def print_rows(rows: list[dict]) -> None:
    """The rows as a plain table on stdout."""
    for r in rows:
        peer = "" if r["peer"] is None else f" | {r['peer_name']}: {r['peer']:,.4g}"
        ratio = "" if r["ratio"] is None else f" | ratio {r['ratio']:.2f}x"
        target = f" (target {r['target']})" if r["target"] else ""
        print(f"{r['metric']} [{r['unit']}]: lmforge {r['lmforge']:,.4g}{peer}{ratio}{target}", flush=True)


def write_result(name: str, title: str, rows: list[dict], details: dict | None = None,
                 copy_to: str | Path | None = None) -> Path:
    """Write ``bench/results/<name>.json`` (temp + rename) with machine, versions, date and the lmforge commit at
    the end of the run (:func:`source_commit`), and a copy to ``copy_to`` when given (a script's own ``--json`` /
    ``--out`` option); returns the results path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "title": title, "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "commit": source_commit(), "machine": machine_info(), "versions": library_versions(), "rows": rows,
               "details": details or {}}
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"wrote {path}", flush=True)
    if copy_to:
        Path(copy_to).parent.mkdir(parents=True, exist_ok=True)
        Path(copy_to).write_bytes(path.read_bytes())
        print(f"wrote {copy_to}", flush=True)
    return path


def lmforge_train_file(config_file: Path, run_dir: Path, nproc: int, skip_steps: int = 2, cpu_only: bool = True) -> dict:
    """:func:`lmforge_train` of a complete training config file (``pretrain.config.to_yaml`` of a resolved
    config: data, tokenizer and ``max_steps`` already in it), so that a peer can read the very same file.

    Raises:
        RuntimeError: the run failed (its output included).
    """
    args = [str(config_file), f"run_dir={run_dir}", f"log_every_steps={skip_steps}", "show_progress=false",
            "data.eval_batches=1", "checkpoint.resume=never"]
    cmd = lmforge_cmd("train", *args) if nproc == 1 else lmforge_cmd("launch", "local", "--nproc", str(nproc), *args)
    result = run_child(cmd, env=python_env(**(CPU_ONLY_ENV if cpu_only else {})))
    check_child(result, f"lmforge training on {nproc} rank(s)")
    return {"tokens_per_s": steady_tokens_per_s(Path(run_dir) / "metrics.jsonl", skip_steps), "nproc": nproc,
            "skip_steps": skip_steps, "wall_s": round(result.wall_s, 2), "peak_rss_bytes": result.peak_rss_bytes}


def write_train_config(path: Path, base: Path, overrides: Sequence[str]) -> Path:
    """``base`` (a training YAML) with ``overrides`` resolved by ``pretrain.config.load_config`` and written to
    ``path`` (``to_yaml``): one file that the lmforge side and its peers both train."""
    use_this_checkout()
    from pretrain.config import load_config, to_yaml

    path.write_text(to_yaml(load_config(base, list(overrides))), encoding="utf-8")
    return path
