import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.errors import InputError
from data_prep.reader import RejectLog, iter_documents, parse_block, read_blocks, resolve_inputs, stdlib_files
from data_prep.sources import plan_segments, resolve_sources
from tests.conftest import ASSETS

TEXTS = ["alpha beta\n", "gamma\n", "delta epsilon\n"]


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
    assert rejects.kinds["malformed JSON"] == 1 and rejects.kinds["invalid UTF-8"] == 1
    assert not (tmp_path / "rejects.jsonl.tmp").exists()


def test_every_format_reads_the_same_documents(tmp_path):
    import datasets
    import zstandard

    lines = "".join(json.dumps({"content": t}) + "\n" for t in TEXTS).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as fh:
        fh.write(lines)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pa.table({"content": TEXTS, "other": [1, 2, 3]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.ipc.new_stream(str(tmp_path / "e.arrow"), table.schema) as w:  # what datasets writes
        w.write_table(table, max_chunksize=2)
    with pa.ipc.new_file(str(tmp_path / "f.arrow"), table.schema) as w:  # IPC file format
        w.write_table(table)
    datasets.Dataset.from_dict({"content": TEXTS}).save_to_disk(str(tmp_path / "g_saved"), num_shards=2)
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e.arrow", "f.arrow", "g_saved"):
        got = [d.text for d in iter_documents([str(tmp_path / name)], text_column="content")]
        assert got == TEXTS, name
    (tmp_path / "t.txt").write_text("one whole document\n\nwith a blank line\n")
    assert [d.text for d in iter_documents([str(tmp_path / "*.txt")])] == ["one whole document\n\nwith a blank line\n"]
    by_line = list(iter_documents([str(tmp_path / "t.txt")], text_mode="line"))
    assert [(d.text, d.record) for d in by_line] == [("one whole document", 1), ("with a blank line", 3)]


def test_folders_globs_and_several_inputs_keep_a_deterministic_order(tmp_path):
    import datasets

    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("bee")
    (tmp_path / "corpus" / "sub" / "a.md").write_text("ay")
    (tmp_path / "corpus" / "ignored.bin").write_bytes(b"\0\1")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
                               "test": datasets.Dataset.from_dict({"text": ["x1"]})})
    dd.save_to_disk(str(tmp_path / "corpus" / "saved"))  # a DatasetDict inside a plain folder
    (tmp_path / "extra.jsonl").write_text('{"text": "j"}\n')
    got = [d.text for d in iter_documents([str(tmp_path / "corpus"), str(tmp_path / "*.jsonl"), str(tmp_path / "corpus" / "b.txt")])]
    assert got == ["bee", "t1", "t2", "x1", "ay", "j"]  # b.txt once; folders sorted; dataset splits in listed order


@pytest.mark.parametrize("text_mode", ["line", "file"])
def test_tasks_split_a_file_by_byte_ranges_and_read_every_record_once(tmp_path, text_mode):
    body = "".join(json.dumps({"text": "x" * (i * 37 % 101 + 1)}) + "\n" for i in range(200)).encode()
    (tmp_path / "a.jsonl").write_bytes(body)
    (tmp_path / "b.txt").write_text("".join(f"line {i}\n" for i in range(50)))
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(300)]}), tmp_path / "c.parquet", row_group_size=40)
    sources = resolve_sources([str(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.parquet")])
    single = [(d.source, d.record, d.text) for d in iter_documents([s.path for s in sources], text_mode=text_mode)]
    for num_tasks in (2, 3, 7):
        got = []
        for task in range(num_tasks):
            segs = plan_segments(sources, task, num_tasks, text_mode)
            for seg in segs:
                for block in read_blocks(seg, text_mode=text_mode, block_bytes=300):
                    p = parse_block(block)
                    got.extend((block.source, r, t) for r, t in zip(p.records, p.texts))
        assert got == single, num_tasks
    assert len(single) == 200 + (50 if text_mode == "line" else 1) + 300


def test_column_sources_reject_nulls_and_wrong_types_with_row_numbers(tmp_path):
    pq.write_table(pa.table({"text": ["ok", None, " ", "fine"]}), tmp_path / "a.parquet")
    rejects = RejectLog()
    assert [(d.text, d.record) for d in iter_documents([str(tmp_path / "a.parquet")], rejects=rejects)] == [("ok", 0), ("fine", 3)]
    assert dict(rejects.counts) == {"field 'text' is null": 1, "empty document": 1}
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    rejects = RejectLog()
    assert list(iter_documents([str(tmp_path / "ints.parquet")], rejects=rejects)) == []
    assert dict(rejects.counts) == {"field 'text' is int, not a string": 2}
    (tmp_path / "l.txt").write_bytes(b"good\n   \nbad \xff byte\r\n\nlast\r\n")
    rejects = RejectLog()
    docs = list(iter_documents([str(tmp_path / "l.txt")], rejects=rejects, text_mode="line"))
    assert [(d.text, d.record) for d in docs] == [("good", 1), ("last", 5)]
    assert dict(rejects.kinds) == {"empty document": 1, "invalid UTF-8": 1}


def test_hub_datasets_stream_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "hubby"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)))
    rejects = RejectLog()
    assert [d.text for d in iter_documents([f"hf:{folder}"], rejects=rejects)] == TEXTS
    assert [d.text for d in iter_documents(resolve_inputs([f"hf:{folder}"]))] == TEXTS  # as tokenizer training reads
    sources = resolve_sources([f"hf:{folder}@train"])
    by_task = [[t for seg in plan_segments(sources, task, 2, "file") for b in read_blocks(seg) for t in parse_block(b).texts]
               for task in range(2)]
    assert sorted(by_task[0] + by_task[1]) == sorted(TEXTS) and all(by_task)  # split by node, every row once
    with pytest.raises(InputError, match=r"hf:.*hubby@train: text column 'body' not found \(columns: text, n\)"):
        list(iter_documents([f"hf:{folder}@train"], text_column="body"))
    with pytest.raises(InputError, match=r"hf:.*nowhere: cannot open with datasets.load_dataset\(streaming=True\)"):
        list(iter_documents([f"hf:{tmp_path / 'nowhere'}"]))


def test_fatal_inputs_raise_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="matched no corpus file"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "f.parquet")
    with pytest.raises(InputError, match=r"f.parquet: text column 'text' not found \(columns: body\)"):
        list(iter_documents([str(tmp_path / "f.parquet")]))
    with pa.ipc.new_stream(str(tmp_path / "g.arrow"), pa.schema([("body", pa.string())])) as w:
        w.write_table(pa.table({"body": ["x"]}))
    with pytest.raises(InputError, match=r"g.arrow: text column 'text' not found"):
        list(iter_documents([str(tmp_path / "g.arrow")]))
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    with pytest.raises(InputError, match=r"t.jsonl.gz: unreadable jsonl input \(EOFError"):
        list(iter_documents([str(tmp_path / "t.jsonl.gz")]))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"bad.parquet: unreadable parquet input") as info:
        list(iter_documents([str(tmp_path / "bad.parquet")]))
    assert "\n" not in str(info.value)


def test_stdlib_corpus_is_real_and_excludes_site_packages():
    files = stdlib_files()
    assert len(files) > 500
    assert not any("site-packages" in f.parts for f in files)
    assert sum(f.stat().st_size for f in files) > 10_000_000


@pytest.mark.parametrize("text_mode", ["file", "line"])
def test_a_utf8_byte_order_mark_is_dropped_not_rejected(tmp_path, text_mode):
    bom = "\ufeff".encode("utf-8")
    lines = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode("utf-8")
    (tmp_path / "a.jsonl").write_bytes(bom + lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as fh:
        fh.write(bom + lines)
    (tmp_path / "c.txt").write_bytes(bom + "".join(TEXTS).encode("utf-8"))
    rejects = RejectLog()
    docs = list(iter_documents([str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.txt")], rejects=rejects,
                               text_mode=text_mode))
    assert rejects.total == 0
    assert [d.text for d in docs[:6]] == TEXTS + TEXTS
    assert "\ufeff" not in "".join(d.text for d in docs)
    assert docs[6].text == ("".join(TEXTS) if text_mode == "file" else TEXTS[0].rstrip("\n"))
