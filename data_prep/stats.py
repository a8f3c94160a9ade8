"""Document-length histograms recorded by prep, and the ``lmforge prep stats`` report.

Prep counts documents per length bin (tokens, per-document special tokens included) on fixed
quarter-octave bins: bin ``i`` holds lengths in ``[edges[i], edges[i + 1])`` with
``edges = unique(floor(2 ** (k / 4)))``, ``k = 0 .. 128``. Fixed bins make the histograms of
tasks add up exactly, and quarter octaves bound the error of a percentile read from them to
about 19 %.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data_prep.encode import TRAIN

log = logging.getLogger(__name__)
HISTOGRAM_PNG = "doc_lengths.png"


def length_bin_edges() -> np.ndarray:
    """Lower edges (tokens) of the document-length bins, int64, from 1 to 2**32."""
    edges = np.floor(2.0 ** (np.arange(0, 4 * 32 + 1) / 4)).astype(np.int64)  # non-decreasing
    return edges[np.concatenate(([True], edges[1:] != edges[:-1]))]  # np.unique, without importing numpy.ma (~40 ms)


_EDGES = length_bin_edges()


def doc_length_counts(lengths: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Add the documents of ``lengths`` (tokens each) to ``counts`` (one int64 per bin); returns the sum."""
    out = np.zeros(len(_EDGES), dtype=np.int64) if counts is None or not len(counts) else counts
    if len(lengths):
        bins = np.clip(np.searchsorted(_EDGES, np.asarray(lengths), side="right") - 1, 0, len(_EDGES) - 1)
        out = out + np.bincount(bins, minlength=len(_EDGES))
    return out


def percentile_tokens(counts: np.ndarray, q: float) -> int:
    """Upper bin edge (tokens) below which at least fraction ``q`` of the documents lie."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() == 0:
        return 0
    i = int(np.searchsorted(np.cumsum(counts), q * counts.sum()))
    return int(_EDGES[min(i + 1, len(_EDGES) - 1)])


def summarize(manifest: dict) -> dict:
    """Counts per split and document-length percentiles from a manifest (no shard is read)."""
    seq_len = manifest["seq_len"]
    report = {"seq_len": seq_len, "objective": manifest.get("objective", "clm"), "token_dtype": manifest["token_dtype"],
              "counts": manifest["counts"], "rejects_by_reason": manifest.get("rejects_by_reason", {}),
              "dedup": manifest.get("config", {}).get("dedup"),
              "duplicates_by_source": manifest.get("duplicates_by_source", {}), "splits": {},
              **{k: manifest[k] for k in ("near_dedup", "near_duplicates_by_source") if k in manifest}}
    for name, split in manifest["splits"].items():
        counts = np.asarray(split.get("doc_length_counts", []), dtype=np.int64)
        entry = {k: split[k] for k in ("documents", "tokens", "sequences") if k in split}
        if counts.size:
            short = counts[_EDGES[: len(counts)] <= seq_len].sum()
            entry.update({
                "doc_tokens_p50": percentile_tokens(counts, 0.5), "doc_tokens_p90": percentile_tokens(counts, 0.9),
                "doc_tokens_p99": percentile_tokens(counts, 0.99),
                "fraction_docs_within_seq_len": round(float(short / max(counts.sum(), 1)), 4),
            })
        report["splits"][name] = entry
    return report


def plot_histogram(manifest: dict, png_path: str | Path) -> Path:
    """Write a log-x bar chart of document lengths (tokens) per split, with ``seq_len`` marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    edges = np.append(_EDGES, _EDGES[-1] * 2)
    top, bottom = 1, len(_EDGES)
    for name, split in manifest["splits"].items():
        counts = np.asarray(split.get("doc_length_counts", []), dtype=np.int64)
        if counts.sum() == 0:
            continue
        top = max(top, int(np.nonzero(counts)[0].max()) + 2)
        bottom = min(bottom, int(np.nonzero(counts)[0].min()))
        ax.stairs(counts, edges[: len(counts) + 1], label=f"{name} ({int(counts.sum()):,} docs)", fill=name == TRAIN, alpha=0.6)
    ax.axvline(manifest["seq_len"], color="k", linestyle="--", label=f"seq_len = {manifest['seq_len']}")
    ax.set_xscale("log")
    ax.set_xlim(max(1, min(edges[bottom], manifest["seq_len"]) // 2), edges[min(top, len(edges) - 1)])
    ax.set_xlabel("document length (tokens, special tokens included)")
    ax.set_ylabel("documents per quarter-octave bin")
    ax.set_title("document lengths")
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


def format_report(report: dict) -> str:
    """The stats as an aligned text table."""
    c = report["counts"]
    lines = [f"seq_len {report['seq_len']}, objective {report['objective']}, token dtype {report['token_dtype']}",
             f"{'split':<6} {'documents':>12} {'tokens':>15} {'sequences':>12} {'p50':>8} {'p90':>8} {'p99':>9} {'<=seq_len':>10}"]
    for name, s in report["splits"].items():
        lines.append(f"{name:<6} {s.get('documents', 0):>12,} {s.get('tokens', 0):>15,} {s.get('sequences', 0):>12,} "
                     f"{s.get('doc_tokens_p50', 0):>8,} {s.get('doc_tokens_p90', 0):>8,} {s.get('doc_tokens_p99', 0):>9,} "
                     f"{s.get('fraction_docs_within_seq_len', 0):>10.1%}")
    lines.append(f"rejects {c['rejects']:,} {report['rejects_by_reason'] or ''}; tokens dropped {c['tokens_dropped']:,}, "
                 f"padded {c.get('tokens_padded', 0):,}")
    if report.get("dedup") is False:
        lines.append("duplicates kept (prepared with --no-dedup)")
    elif report.get("dedup"):
        by_source = ", ".join(f"{k} {v:,}" for k, v in report.get("duplicates_by_source", {}).items())
        lines.append(f"duplicates dropped {c.get('duplicates', 0):,}" + (f": {by_source}" if by_source else ""))
    if nd := report.get("near_dedup"):
        by_source = ", ".join(f"{k} {v:,}" for k, v in report.get("near_duplicates_by_source", {}).items())
        lines.append(f"near duplicates dropped {nd['removed']:,} ({nd['library']}, {nd['n_grams']}-grams, {nd['buckets']} buckets "
                     f"x {nd['hashes_per_bucket']} hashes, Jaccard threshold ~{nd['threshold']}, {nd['scope']})"
                     + (f": {by_source}" if by_source else ""))
    lines.append("(document lengths in tokens, read from quarter-octave bins: upper bin edges)")
    return "\n".join(lines)


def format_mixture(rows: list[dict], planned_samples: int, schedule_phases: int = 0) -> str:
    """A blend's effective mixture as a table: per source its sequences, configured weight and ``max_epochs``,
    and over ``planned_samples`` the sequences and tokens read, the epochs and the effective share
    (rows as :meth:`data_prep.blend.BlendedReader.mixture` gives them, plus ``weight``, ``max_epochs``, ``sequences``)."""
    lines = [f"mixture over {planned_samples:,} planned samples" + (f" ({schedule_phases} schedule phases)" if schedule_phases else ""),
             f"{'source':<40} {'sequences':>10} {'weight':>7} {'cap':>6} {'samples':>12} {'tokens':>15} {'epochs':>7} {'share':>6}"]
    for r in rows:
        cap = f"{r['max_epochs']:g}" if r.get("max_epochs") else "-"
        lines.append(f"{str(r['path'])[-40:]:<40} {r['sequences']:>10,} {r['weight']:>7.3g} {cap:>6} {r['samples']:>12,} "
                     f"{r['tokens']:>15,} {r['epochs']:>7.2f} {r['share']:>6.1%}")
    return "\n".join(lines)
