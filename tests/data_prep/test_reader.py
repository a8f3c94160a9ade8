import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.errors import InputError
from data_prep.reader import RejectLog, iter_documents, resolve_inputs, stdlib_files
from tests.conftest import ASSETS


def test_mixed_jsonl_rejects_each_bad_record_and_keeps_the_good(tmp_path):
    rejects = RejectLog(tmp_path / "rejects.jsonl")
    docs = list(iter_documents([str(ASSETS / "mixed.jsonl")], rejects=rejects))
    rejects.close()
    assert [d.record for d in docs] == [1, 8]
    assert docs[0].text.startswith("def add")
    rows = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["record"] for r in rows] == [2, 3, 4, 5, 7, 9]
    reasons = " | ".join(r["reason"] for r in rows)
    for part in ("malformed JSON", "missing field 'text'", "is int, not a string", "empty document",
                 "not an object", "invalid UTF-8"):
        assert part in reasons
    assert rejects.total == 6
    assert not (tmp_path / "rejects.jsonl.tmp").exists()


def test_every_format_reads_the_same_documents(tmp_path):
    texts = ["alpha beta\n", "gamma\n", "delta epsilon\n"]
    lines = "".join(json.dumps({"content": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as fh:
        fh.write(lines)
    import zstandard

    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"content": texts}), tmp_path / "d.parquet")
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"):
        got = [d.text for d in iter_documents([str(tmp_path / name)], text_column="content")]
        assert got == texts, name
    (tmp_path / "e.txt").write_text("one whole document\n")
    assert [d.text for d in iter_documents([str(tmp_path / "*.txt")])] == ["one whole document\n"]


def test_fatal_inputs_raise_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="matched no corpus file"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "f.parquet")
    with pytest.raises(InputError, match="text column 'text' not found"):
        list(iter_documents([str(tmp_path / "f.parquet")]))


def test_stdlib_corpus_is_real_and_excludes_site_packages():
    files = stdlib_files()
    assert len(files) > 500
    assert not any("site-packages" in f.parts for f in files)
    assert sum(f.stat().st_size for f in files) > 10_000_000
