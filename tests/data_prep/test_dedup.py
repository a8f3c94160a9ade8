"""Exact deduplication at prep: planted duplicates across two files and two array tasks; ``prep stats`` and ``--no-dedup``."""
import hashlib
import json
from pathlib import Path

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


def _task_order_stream(manifest, out, split="train"):
    """The split's tokens in task order, as bytes: each task's full rows (its ``part-T-*`` shards) then the tail it
    left for the merge (its marker). One task's stream and two tasks' are the same corpus order cut in other places."""
    import numpy as np
    import pyarrow as pa

    parts = []
    for marker in sorted((out / "parts").glob("part-*.json")):
        rows = [pa.ipc.open_stream(pa.memory_map(str(out / s["path"]), "r")).read_all().column("input_ids").combine_chunks()
                for s in manifest["splits"][split]["shards"] if Path(s["path"]).name.startswith(marker.stem + "-")]
        parts += [np.asarray(r.values, dtype=np.int64) for r in rows]
        parts.append(np.asarray(json.loads(marker.read_text())["splits"][split]["tail_tokens"], dtype=np.int64))
    return np.concatenate(parts).tobytes()


def test_exact_duplicates_are_dropped_first_occurrence_kept_whatever_the_tasks_and_workers(tmp_path, tokenizer_dir, capsys):
    a, b = _write(tmp_path / "a.jsonl", A), _write(tmp_path / "b.jsonl", B)
    assert normalise(B[-3]) == UNIQUE[5]
    one = _prep(tokenizer_dir, [a, b], tmp_path / "one", workers=1)
    assert one["counts"]["documents"] == 40 and one["counts"]["duplicates"] == 4
    assert one["duplicates_by_source"] == {a: 1, b: 3}

    hand = tmp_path / "hand"  # the same first occurrences, deduplicated by hand: the same shard bytes
    hand.mkdir()
    hand_inputs = [_write(hand / "a.jsonl", A[:-1]), _write(hand / "b.jsonl", B[:-3])]
    reference = _prep(tokenizer_dir, hand_inputs, tmp_path / "ref", workers=1, dedup=False)
    assert _shard_digests(one, tmp_path / "one") == _shard_digests(reference, tmp_path / "ref")

    digests = []
    for workers in (1, 2):  # two array tasks, the second run first: it hashes task 0's share itself
        out = tmp_path / f"two-{workers}"
        assert _prep(tokenizer_dir, [a, b], out, workers=workers, num_tasks=2, task_id=1) is None
        two = _prep(tokenizer_dir, [a, b], out, workers=workers, num_tasks=2, task_id=0)
        assert two["counts"] == one["counts"] and two["duplicates_by_source"] == {a: 1, b: 3}
        assert not list((out / "parts").glob("hashes-*"))  # removed after the merge
        digests.append(_shard_digests(two, out))
        for split in ("train", "val"):  # the same kept documents, token for token, as with one task
            assert _task_order_stream(two, out, split) == _task_order_stream(one, tmp_path / "one", split), split
    assert digests[0] == digests[1]

    from lmforge.cli import main

    assert main(["prep", "stats", str(tmp_path / "one")]) == 0
    assert f"duplicates dropped 4: {a} 1, {b} 3" in capsys.readouterr().out.splitlines()
    assert main(["prep", "--input", a, b, "--tokenizer", str(tokenizer_dir), "--output", str(tmp_path / "all"),
                 "--seq-len", "32", "--val-fraction", "0.2", "--workers", "1", "--no-progress", "--no-dedup"]) == 0
    kept = json.loads((tmp_path / "all" / "manifest.json").read_text())
    assert kept["counts"]["documents"] == 44 and kept["counts"]["duplicates"] == 0 and kept["config"]["dedup"] is False
    assert main(["prep", "stats", str(tmp_path / "all")]) == 0
    assert "duplicates kept (prepared with --no-dedup)" in capsys.readouterr().out.splitlines()
