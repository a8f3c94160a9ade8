"""Near-duplicate removal (datatrove MinHash) at prep: planted near duplicates dropped, distinct documents kept."""
import json
import random

import pytest

from data_prep.near_dedup import NearDedupParams
from data_prep.prep import PrepConfig, prepare
from data_prep.stats import format_report, summarize

pytest.importorskip("datatrove", reason="the dedup extra (pip install 'lmforge[dedup]')")

_rng = random.Random(0)
_WORDS = ["".join(_rng.choice("abcdefghijklmnop") for _ in range(6)) for _ in range(3000)]
DISTINCT = [" ".join(_rng.choice(_WORDS) for _ in range(120)) for _ in range(24)]


def _edited(text: str, k: int) -> str:
    """``text`` with a few small edits: two words changed, one dropped, a sentence appended, case changed."""
    w = text.split()
    w[5], w[60] = "edited", f"changed{k}"
    del w[90]
    return " ".join(w).capitalize() + " An extra closing sentence."


NEAR = [_edited(DISTINCT[i], i) for i in (2, 9, 17)]


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def test_planted_near_duplicates_are_dropped_distinct_kept_and_parameters_recorded(tmp_path, tokenizer_dir):
    a = _write(tmp_path / "a.jsonl", DISTINCT[:12])
    b = _write(tmp_path / "b.jsonl", DISTINCT[12:] + NEAR + [DISTINCT[4]])  # + one exact duplicate
    outs = {}
    for workers in (1, 2):
        cfg = PrepConfig(inputs=[a, b], tokenizer=str(tokenizer_dir), output=str(tmp_path / f"w{workers}"), seq_len=32,
                         val_fraction=0.0, near_dedup=True, workers=workers, block_bytes=4096, show_progress=False)
        outs[workers] = prepare(cfg)
    m = outs[1]
    assert m["counts"]["documents"] == 24 and m["counts"]["duplicates"] == 1  # the 24 distinct ones, once each
    assert m["near_duplicates_by_source"] == {b: 3}
    assert m["near_dedup"] == {**NearDedupParams().record(3), "scope": "whole corpus"}
    assert m["near_dedup"]["threshold"] == pytest.approx((1 / 14) ** (1 / 8), abs=1e-4)
    assert m["config"]["near_dedup_ngrams"] == 5 and m["config"]["near_dedup_buckets"] == 14
    assert outs[2]["splits"]["train"]["tokens"] == m["splits"]["train"]["tokens"]  # independent of the workers
    assert outs[2]["near_duplicates_by_source"] == m["near_duplicates_by_source"]
    assert "near duplicates dropped 3 (datatrove MinHash, 5-grams, 14 buckets x 8 hashes" in format_report(summarize(m))
    plain = prepare(PrepConfig(inputs=[a, b], tokenizer=str(tokenizer_dir), output=str(tmp_path / "plain"), seq_len=32,
                               val_fraction=0.0, workers=1, show_progress=False))
    assert plain["counts"]["documents"] == 27 and "near_dedup" not in plain  # off by default: the edits are kept


def test_near_dedup_without_datatrove_is_a_one_line_error(monkeypatch, tmp_path):
    import importlib.util

    from data_prep.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datatrove" else real(name, *a))
    with pytest.raises(UserError, match=r"^prep config: near_dedup needs datatrove, which is not installed "
                                        r"\(pip install 'lmforge\[dedup\]'\)$"):
        PrepConfig(inputs=["x"], tokenizer="t", output=str(tmp_path), near_dedup=True).validate()
