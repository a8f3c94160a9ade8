"""Exact deduplication at prep: planted duplicates across two files and two array tasks."""
import hashlib
import json

from data_prep.dedup import normalise
from data_prep.prep import PrepConfig, prepare

UNIQUE = [f"document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(30 + i)) for i in range(40)]
A = UNIQUE[:20] + [UNIQUE[3]]  # a duplicate inside a.jsonl
B = UNIQUE[20:] + [UNIQUE[5] + "  \r\n", UNIQUE[0], UNIQUE[25]]  # two of a's (one as CRLF), one of b's


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def _prep(tok, inputs, out, **kw):
    cfg = dict(inputs=inputs, tokenizer=str(tok), output=str(out), seq_len=32, val_fraction=0.2, show_progress=False)
    return prepare(PrepConfig(**{**cfg, **kw}))


def _shard_digests(manifest, out):
    return [hashlib.sha256((out / s["path"]).read_bytes()).hexdigest() for split in manifest["splits"].values()
            for s in split["shards"]]


def test_exact_duplicates_are_dropped_first_occurrence_kept_whatever_the_tasks_and_workers(tmp_path, tokenizer_dir):
    a, b = _write(tmp_path / "a.jsonl", A), _write(tmp_path / "b.jsonl", B)
    assert normalise(B[-3]) == UNIQUE[5]
    one = _prep(tokenizer_dir, [a, b], tmp_path / "one", workers=1)
    assert one["counts"]["documents"] == 40 and one["counts"]["duplicates"] == 4
    assert one["duplicates_by_source"] == {a: 1, b: 3}

    hand = tmp_path / "hand"  # the same first occurrences, deduplicated by hand: the same shard bytes
    hand.mkdir()
    reference = _prep(tokenizer_dir, [_write(hand / "a.jsonl", A[:-1]), _write(hand / "b.jsonl", B[:-3])],
                      tmp_path / "ref", workers=1, dedup=False)
    assert _shard_digests(one, tmp_path / "one") == _shard_digests(reference, tmp_path / "ref")

    digests = []
    for workers in (1, 2):  # two array tasks, the second run first: it hashes task 0's share itself
        out = tmp_path / f"two-{workers}"
        assert _prep(tokenizer_dir, [a, b], out, workers=workers, num_tasks=2, task_id=1) is None
        two = _prep(tokenizer_dir, [a, b], out, workers=workers, num_tasks=2, task_id=0)
        assert two["counts"] == one["counts"] and two["duplicates_by_source"] == {a: 1, b: 3}
        assert not list((out / "parts").glob("hashes-*"))  # removed after the merge
        digests.append(_shard_digests(two, out))
    assert digests[0] == digests[1]

    kept = _prep(tokenizer_dir, [a, b], tmp_path / "all", workers=1, dedup=False)
    assert kept["counts"]["documents"] == 44 and kept["counts"]["duplicates"] == 0
