"""bench/bench_prep.py's size sweep, in-process on made-up trials: the datatrove peer stops at its memory cap and its
fits (and lmforge's against it) use only the sizes it ran at."""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _setting(mb: float, methods: dict[str, float]) -> dict:
    """One (size, 1 worker) setting whose method ``m`` took ``a + b_m * mb`` s in each of 3 rounds."""
    return {"jsonl_mb": mb, "workers": 1,
            "trials": {m: [{"wall_s": 0.3 + per_mb * mb} for _ in range(3)] for m, per_mb in methods.items()}}


def test_peer_fits_use_only_the_sizes_the_peer_ran_at(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("common", "prep_peers", "bench_prep"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import bench_prep

    big = 4 * bench_prep.DATATROVE_MAX_MB
    settings = [_setting(16, {"lmforge": 0.13, "raw": 0.14, "datatrove": 0.3}),
                _setting(bench_prep.DATATROVE_MAX_MB, {"lmforge": 0.13, "raw": 0.14, "datatrove": 0.3}),
                _setting(big, {"lmforge": 0.13, "raw": 0.14})]
    rows = {(r["metric"].split(" of t")[0], r["peer_name"].split(" ")[0]): r for r in bench_prep.fit_rows(settings, "")}
    assert set(rows) == {(k, p) for k in ("fixed cost a", "cost per MB b") for p in ("tokenizers", "datatrove")}
    assert f"16, {bench_prep.DATATROVE_MAX_MB:.0f}, {big:.0f} MB" in rows["cost per MB b", "tokenizers"]["metric"]
    assert f"16, {bench_prep.DATATROVE_MAX_MB:.0f} MB" in rows["cost per MB b", "datatrove"]["metric"]
    assert abs(rows["cost per MB b", "datatrove"]["peer"] - 0.3) < 1e-9
    assert abs(rows["cost per MB b", "datatrove"]["lmforge"] - 0.13) < 1e-9
    assert abs(rows["fixed cost a", "tokenizers"]["lmforge"] - 0.3) < 1e-9
    assert f"run at <= {bench_prep.DATATROVE_MAX_MB:g} MB only" in rows["cost per MB b", "datatrove"]["peer_name"]
