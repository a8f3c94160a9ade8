import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.errors import InputError, UserError
from data_prep.prep import PrepConfig, is_validation, prepare
from data_prep.reader import iter_documents
from data_prep.shards import ShardReader, read_manifest, sha256_file
from data_prep.tokenizer.folder import fingerprint


def test_manifest_counts_checksums_and_dtype(prepared_dir, tokenizer_dir):
    m = read_manifest(prepared_dir)
    c, splits = m["counts"], m["splits"]
    assert m["seq_len"] == 64 and m["token_dtype"] == "uint16"
    assert m["tokenizer"]["fingerprint"] == fingerprint(tokenizer_dir)
    assert c["documents"] == splits["train"]["documents"] + splits["val"]["documents"]
    assert c["sequences"] == sum(s["sequences"] for sp in splits.values() for s in sp["shards"])
    assert c["tokens"] == c["sequences"] * 64 + c["tokens_dropped"]
    assert len(splits["train"]["shards"]) >= 2  # 1000 sequences per shard
    for sp in splits.values():
        for shard in sp["shards"]:
            path = prepared_dir / shard["path"]
            assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"]
    assert not list(prepared_dir.rglob("*.tmp"))


def test_shards_hold_exactly_the_documents_plus_eos(prepared_dir, tokenizer_dir, corpus_dirs):
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    expected = []
    for doc in iter_documents(corpus_dirs):
        if not is_validation(doc.text, 0.1):
            expected.extend(tok.encode(doc.text, add_special_tokens=False).ids + [eos])
    reader = ShardReader(prepared_dir, "train")
    got = np.concatenate([reader[i] for i in range(len(reader))])
    assert got.tolist() == expected[: len(got)]
    assert len(expected) - len(got) < 64
    # document starts point just after an EOS (or at a sequence start that follows one)
    for i in range(1, 20):
        for s in reader.document_starts(i):
            prev = reader[i][s - 1] if s > 0 else reader[i - 1][-1]
            assert prev == eos


def test_validation_split_is_by_document_with_no_leakage(prepared_dir, corpus_dirs):
    docs = list(iter_documents(corpus_dirs))
    val = [d for d in docs if is_validation(d.text, 0.1)]
    m = read_manifest(prepared_dir)
    assert m["splits"]["val"]["documents"] == len(val) > 0
    assert m["splits"]["train"]["documents"] == len(docs) - len(val)
    assert all(is_validation(d.text, 0.1) for d in val)  # a pure function of the text


def test_folder_opens_with_datasets(prepared_dir):
    import datasets

    dd = datasets.load_from_disk(str(prepared_dir))
    for split in ("train", "val"):
        reader = ShardReader(prepared_dir, split)
        assert len(dd[split]) == len(reader) > 0
        last = len(reader) - 1
        assert dd[split][last]["input_ids"] == reader[last].tolist()
        assert dd[split][last]["document_starts"] == reader.document_starts(last)
        assert dd[split][last]["num_tokens"] == reader.num_tokens(last) == 64


def test_empty_corpus_and_existing_output(tmp_path, tokenizer_dir, prepared_dir, corpus_dirs):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": " "}\n{"text": ""}\n')
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"empty corpus, no usable document \(2 rejected"):
        prepare(PrepConfig(inputs=[str(empty)], tokenizer=str(tokenizer_dir), output=str(out), show_progress=False))
    assert not (out / "manifest.json").exists()
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 2
    with pytest.raises(UserError, match="already holds a prepared dataset"):
        prepare(PrepConfig(inputs=corpus_dirs, tokenizer=str(tokenizer_dir), output=str(prepared_dir), show_progress=False))
    with pytest.raises(UserError, match=r"seq_len=1 must be >= 2 tokens; val_fraction=1.5"):
        PrepConfig(inputs=[], tokenizer="", output="", seq_len=1, val_fraction=1.5).validate()


def test_shard_size_mismatch_is_refused(tmp_path, prepared_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared_dir, copy)
    shard = copy / json.loads((copy / "manifest.json").read_text())["splits"]["train"]["shards"][0]["path"]
    with open(shard, "ab") as fh:
        fh.write(b"junk")
    reader = ShardReader(copy, "train")  # shards open lazily: the check runs on first access
    with pytest.raises(InputError, match=rf"shard {shard} is \d+ bytes, manifest says \d+"):
        reader[0]


def test_reader_opens_shards_lazily_and_keeps_at_most_max_open(prepared_dir):
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    counts = [s["sequences"] for s in manifest["splits"]["train"]["shards"]]
    assert len(counts) >= 3, "the fixture needs several train shards"
    eager = ShardReader(prepared_dir, "train", max_open_shards=len(counts))
    lazy = ShardReader(prepared_dir, "train", max_open_shards=2)
    assert lazy.open_shards == 0 and len(lazy) == sum(counts)
    firsts = [sum(counts[:i]) for i in range(len(counts))]  # first row of each shard
    for i in firsts + firsts[::-1] + [len(lazy) - 1]:
        assert (lazy[i] == eager[i]).all() and lazy.document_starts(i) == eager.document_starts(i)
        assert lazy.num_tokens(i) == eager.num_tokens(i)
        assert lazy.open_shards <= 2
    view = lazy[firsts[0]]
    for i in firsts[1:]:
        lazy[i]  # evicts shard 0's map; the view handed out keeps its mapping alive
    assert (view == eager[firsts[0]]).all()
    assert eager.open_shards == len(counts)


def _corpus(tmp_path, corpus_dirs):
    """A mixed corpus: the stdlib packages plus jsonl with bad records, parquet and a text file read per line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import ASSETS

    texts = [d.text for d in iter_documents(corpus_dirs[:1])]
    pq.write_table(pa.table({"text": texts[:20]}), tmp_path / "p.parquet", row_group_size=7)
    (tmp_path / "lines.txt").write_text("\n".join(t.replace("\n", " ") for t in texts[20:40]) + "\n")
    return [*corpus_dirs, str(ASSETS / "mixed.jsonl"), str(tmp_path / "p.parquet"), str(tmp_path / "lines.txt")]


def _shard_digests(manifest):
    return {s: [(sh["path"], sh["sha256"]) for sh in sp["shards"]] for s, sp in manifest["splits"].items()}


def test_output_bytes_do_not_depend_on_the_worker_count(tmp_path, tokenizer_dir, corpus_dirs):
    inputs = _corpus(tmp_path, corpus_dirs)
    runs = {}
    for workers, block_bytes in ((1, 1 << 20), (2, 20_000)):
        runs[workers] = prepare(PrepConfig(inputs=inputs, tokenizer=str(tokenizer_dir), output=str(tmp_path / f"w{workers}"),
                                           seq_len=64, val_fraction=0.1, text_mode="line", sequences_per_shard=700,
                                           workers=workers, block_bytes=block_bytes, show_progress=False))
    assert _shard_digests(runs[1]) == _shard_digests(runs[2])
    assert len(runs[1]["splits"]["train"]["shards"]) >= 3
    assert runs[1]["counts"] == runs[2]["counts"]
    assert runs[1]["counts"]["rejects"] == 6  # mixed.jsonl's six (in line mode an empty file holds no record)
    assert (tmp_path / "w1" / "rejects.jsonl").read_bytes() == (tmp_path / "w2" / "rejects.jsonl").read_bytes()


def test_array_tasks_plus_merge_match_one_task_and_reruns_skip(tmp_path, tokenizer_dir, corpus_dirs):
    inputs = _corpus(tmp_path, corpus_dirs)
    common = dict(inputs=inputs, tokenizer=str(tokenizer_dir), seq_len=64, val_fraction=0.1, text_mode="line",
                  sequences_per_shard=700, workers=1, show_progress=False)
    one = prepare(PrepConfig(output=str(tmp_path / "one"), **common))
    out = tmp_path / "many"
    results = [prepare(PrepConfig(output=str(out), num_tasks=3, task_id=t, **common)) for t in (2, 0, 1)]
    assert results[0] is None and results[1] is None  # the last task to finish merges
    many = results[2]
    assert many["counts"] == one["counts"]
    for split in ("train", "val"):
        a, b = one["splits"][split], many["splits"][split]
        assert {k: a[k] for k in a if k != "shards"} == {k: b[k] for k in b if k != "shards"}
        assert len(ShardReader(out, split)) == b["sequences"]
    assert many["tasks"]["num_tasks"] == 3
    assert sorted((out / "rejects.jsonl").read_text().splitlines()) == sorted((tmp_path / "one" / "rejects.jsonl").read_text().splitlines())
    marker = out / "parts" / "part-00001.json"
    before = marker.stat().st_mtime_ns
    assert prepare(PrepConfig(output=str(out), num_tasks=3, task_id=1, **common))["plan"] == many["plan"]
    assert marker.stat().st_mtime_ns == before  # finished task skipped, nothing rewritten
    with pytest.raises(UserError, match="another config or corpus; pass --overwrite"):
        prepare(PrepConfig(output=str(out), num_tasks=3, task_id=1, **{**common, "seq_len": 32}))


def test_merge_refuses_while_tasks_are_missing(tmp_path, tokenizer_dir, corpus_dirs):
    from data_prep.merge import merge

    out = tmp_path / "partial"
    cfg = PrepConfig(inputs=corpus_dirs[:1], tokenizer=str(tokenizer_dir), output=str(out), seq_len=64, num_tasks=4,
                     task_id=2, workers=1, show_progress=False)
    assert prepare(cfg) is None
    with pytest.raises(UserError, match=r"3 of 4 tasks not finished \(task ids 0, 1, 3\)"):
        merge(out)
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError, match=r"part-00002.json: a part prepared from another config .* pass --overwrite"):
        prepare(PrepConfig(**{**cfg.__dict__, "num_tasks": 2, "task_id": 0}))
    for task in (0, 1):  # the same corpus as 2 tasks: the stale 4-task parts are replaced, then removed at the merge
        m = prepare(PrepConfig(**{**cfg.__dict__, "num_tasks": 2, "task_id": task, "overwrite": True}))
    assert m["tasks"]["num_tasks"] == 2
    assert sorted(p.name for p in (out / "parts").iterdir()) == [
        "part-00000.json", "part-00000.rejects.jsonl", "part-00001.json", "part-00001.rejects.jsonl"]
    assert all(sh.name.startswith(("part-00000", "part-00001", "tails")) for sh in (out / "train").glob("*.arrow"))
