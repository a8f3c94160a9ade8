"""Byte-budget sampling of tokenizer text: within budget, uniform across sources, deterministic, streamed in bounded batches."""
import gzip
import json
import random

import pytest

from data_prep.tokenizer.corpus import CorpusStats, CorpusText
from data_prep.tokenizer.train import TokenizerTrainConfig, train_tokenizer

WORDS = "alpha beta gamma delta river stone bridge library train star letter number table".split()


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A: 600 documents, B: 200 documents (100-500 bytes each); returns (paths, {path: {text: bytes}})."""
    root = tmp_path_factory.mktemp("sources")
    rng = random.Random(1)
    docs = {}
    for name, count in (("a.jsonl", 600), ("b.jsonl", 200)):
        texts = [f"{name} {i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 80))) for i in range(count)]
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        docs[str(root / name)] = {t: len(t.encode()) for t in texts}
    return [str(root / "a.jsonl"), str(root / "b.jsonl")], docs


def _kept(text: CorpusText) -> tuple[list[str], CorpusStats, list[int]]:
    stats = CorpusStats()
    batches = list(text.batches(stats))
    return [t for b in batches for t in b], stats, [sum(len(t.encode()) for t in b) for b in batches]


def test_budget_is_honoured_uniformly_and_deterministically(two_sources):
    paths, docs = two_sources
    total = sum(sum(d.values()) for d in docs.values())
    budget = total * 3 // 10
    kept, stats, _ = _kept(CorpusText(paths, max_bytes=budget, seed=0))
    assert stats.text_bytes == sum(len(t.encode()) for t in kept) <= budget
    assert stats.text_bytes > budget - 2 * 500  # within a hash bucket or two (<= 500 bytes a document here)
    assert stats.seen_documents == 800 and stats.documents == len(kept)
    for path, source in docs.items():  # each source keeps about 30% of its bytes, whatever its size or order
        share = sum(source[t] for t in kept if t in source) / sum(source.values())
        assert 0.2 < share < 0.4, (path, share)
    again, _, _ = _kept(CorpusText(paths, max_bytes=budget, seed=0))
    assert again == kept
    other, other_stats, _ = _kept(CorpusText(paths, max_bytes=budget, seed=1))
    assert set(other) != set(kept) and budget - 1000 < other_stats.text_bytes <= budget


def test_batches_are_bounded_and_the_first_pass_only_runs_when_needed(two_sources, tmp_path):
    paths, docs = two_sources
    total = sum(sum(d.values()) for d in docs.values())
    text = CorpusText(paths, max_bytes=10 * total, batch_bytes=4096)
    kept, stats, sizes = _kept(text)
    assert text.corpus_text_bytes is None and text.keep_fraction == 1.0  # disk size fits: no counting pass
    assert stats.text_bytes == total and len(kept) == 800
    assert max(sizes) < 4096 + 500  # memory per batch: batch_bytes plus at most one document
    packed = tmp_path / "a.jsonl.gz"
    with open(paths[0], "rb") as src, gzip.open(packed, "wb") as dst:
        dst.write(src.read())
    text = CorpusText([str(packed)], max_bytes=10 * total)
    kept, _, _ = _kept(text)
    assert text.corpus_text_bytes == sum(docs[paths[0]].values())  # compressed: counted first, then all kept
    assert len(kept) == 600


def test_records_tokenizers_cannot_take_are_rejected(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n{"text": ""}\n')
    kept, stats, _ = _kept(CorpusText([str(src)]))
    assert kept == ["fine"]
    assert stats.rejects.counts == {"lone surrogate at character 5": 1, "empty document": 1}


def test_training_records_the_sample(two_sources, tmp_path):
    paths, docs = two_sources
    total = sum(sum(d.values()) for d in docs.values())
    train_tokenizer(TokenizerTrainConfig(inputs=paths, output=str(tmp_path / "tok"), family="bpe", vocab_size=120,
                                         max_bytes=total // 4, seed=3))
    meta = json.loads((tmp_path / "tok" / "lmforge_tokenizer.json").read_text())
    assert meta["text_bytes"] <= total // 4 < meta["corpus_text_bytes"] == total
    assert 0 < meta["sample_fraction"] < 0.5 and meta["seed"] == 3 and meta["documents"] < 800


def test_prefetch_keeps_order_reraises_reader_errors_and_stops_when_closed():
    import threading

    from data_prep.errors import InputError
    from data_prep.tokenizer.corpus import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise InputError("x.parquet: text column 'text' not found")

    got = []
    with pytest.raises(InputError, match="text column"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1]
    endless = prefetched(iter(range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close()
    assert not any(t.name == "tokenizer-corpus-reader" for t in threading.enumerate())
