import glob
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.errors import InputError, UserError
from data_prep.prep import PrepConfig, is_validation, prepare
from data_prep.reader import iter_documents
from data_prep.shards import ShardReader, read_manifest, sha256_file


def test_manifest_counts_checksums_and_dtype(prepared_dir, tokenizer_dir):
    m = read_manifest(prepared_dir)
    c, splits = m["counts"], m["splits"]
    assert m["seq_len"] == 64 and m["token_dtype"] == "uint16"
    assert m["tokenizer"]["fingerprint"] == __import__("data_prep.tokenizer").tokenizer.fingerprint(tokenizer_dir)
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


def test_split_opens_with_datasets(prepared_dir):
    import datasets

    ds = datasets.concatenate_datasets(
        [datasets.Dataset.from_file(p) for p in sorted(glob.glob(str(prepared_dir / "train" / "*.arrow")))])
    reader = ShardReader(prepared_dir, "train")
    assert len(ds) == len(reader)
    assert ds[5]["input_ids"] == reader[5].tolist()


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
    with pytest.raises(InputError, match="manifest says"):
        ShardReader(copy, "train")
