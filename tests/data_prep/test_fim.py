"""Fill-in-the-middle: the character-level transform, its inverse, and the tokenizer's sentinels."""
from __future__ import annotations

import random

import pytest

from data_prep.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, FIM_TOKENS, FimSpec, apply_fim, fim_draw, undo_fim


def documents(n: int) -> list[str]:
    rng = random.Random(7)
    alphabet = "abc xyz\n\t()=:é漢字🙂"
    return [""] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def test_transform_is_deterministic_reversible_and_realises_its_rates():
    docs = documents(4000)
    spec = FimSpec(rate=0.5, spm_rate=0.5, seed=3)
    out = [apply_fim(d, spec) for d in docs]
    assert out == [apply_fim(d, spec) for d in docs]  # the same document always gets the same draw
    assert [undo_fim(o) for o in out] == docs
    drawn = [fim_draw(d, spec) for d in docs]
    fim = [(o, x) for o, x in zip(out, drawn) if x is not None]
    spm = [o for o, x in fim if x[0] == "spm"]
    assert abs(len(fim) / len(docs) - 0.5) < 0.03 and abs(len(spm) / len(fim) - 0.5) < 0.04
    assert all(o.startswith(FIM_PREFIX + FIM_SUFFIX) for o in spm)
    psm = [o for o, x in fim if x[0] == "psm"]
    assert all(o.index(FIM_PREFIX) < o.index(FIM_SUFFIX) < o.index(FIM_MIDDLE) for o in psm)
    other_seed = [apply_fim(d, FimSpec(rate=0.5, spm_rate=0.5, seed=4)) for d in docs]
    assert other_seed != out
    assert all(apply_fim(d, FimSpec()) == d for d in docs)  # rate 0: untouched


def test_rates_outside_unit_interval_are_named():
    assert FimSpec(rate=1.5, spm_rate=-0.1).problems() == ["--fim-rate 1.5 is outside [0, 1]",
                                                          "--fim-spm-rate -0.1 is outside [0, 1]"]


def test_tokenizer_fim_adds_sentinels_that_survive_encode_and_decode(tmp_path, corpus_dirs):
    from data_prep.tokenizer.folder import load_tokenizer
    from data_prep.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    train_tokenizer(TokenizerTrainConfig(inputs=corpus_dirs[:1], output=str(tmp_path / "tok"), vocab_size=400, fim=True))
    tok = load_tokenizer(tmp_path / "tok")
    ids = [tok.convert_tokens_to_ids(t) for t in FIM_TOKENS]
    assert len(set(ids)) == 4 and all(i in tok.all_special_ids for i in ids)
    doc = "def f(x):\n    return x + 1  # é\n"
    sample = apply_fim(doc, FimSpec(rate=1.0, spm_rate=0.0, seed=1))
    encoded = tok(sample, add_special_tokens=False)["input_ids"]
    assert sum(i in ids for i in encoded) == 3  # each sentinel is one id
    assert undo_fim(tok.decode(encoded)) == doc


@pytest.mark.parametrize("bad", [FIM_PREFIX + "abc", FIM_PREFIX + FIM_SUFFIX + "abc"])
def test_malformed_fim_text_is_refused(bad):
    with pytest.raises(ValueError):
        undo_fim(bad)


def test_prep_fim_shards_decode_and_reassemble_to_the_original_documents(tmp_path, corpus_dirs):
    """prep --fim-rate: every document of the shards, decoded and un-FIM'd, is the corpus document; the shards are the
    same bytes with one worker as with two."""
    import json

    import numpy as np

    from data_prep.errors import UserError
    from data_prep.prep import PrepConfig, is_validation, prepare
    from data_prep.reader import iter_documents
    from data_prep.shards import ShardReader, read_manifest
    from data_prep.tokenizer.folder import load_tokenizer
    from data_prep.tokenizer.train import TokenizerTrainConfig, train_byte_bpe, train_tokenizer

    inputs = corpus_dirs[:1]
    tok_dir = tmp_path / "tok"
    train_tokenizer(TokenizerTrainConfig(inputs=inputs, output=str(tok_dir), vocab_size=600, fim=True))
    out = tmp_path / "data"
    prepare(PrepConfig(inputs=inputs, tokenizer=str(tok_dir), output=str(out), seq_len=256, val_fraction=0.1, tail="pad",
                       fim_rate=0.5, fim_spm_rate=0.5, workers=2, show_progress=False, block_bytes=1 << 16))
    manifest = read_manifest(out)
    assert manifest["config"]["fim_rate"] == 0.5 and set(manifest["tokenizer"]["fim_token_ids"]) == {
        FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX}
    tok = load_tokenizer(tok_dir)
    docs = [d.text for d in iter_documents(inputs)]
    transformed = 0
    for split, want_val in (("train", False), ("val", True)):
        reader = ShardReader(out, split)
        stream = np.concatenate([reader[i][: reader.num_tokens(i)] for i in range(len(reader))])
        ends = np.flatnonzero(stream == tok.eos_token_id)
        pieces = np.split(stream, ends + 1)[:-1]
        decoded = [tok.decode(p[:-1].tolist()) for p in pieces]
        transformed += sum(d.startswith(FIM_PREFIX) for d in decoded)
        expected = [d for d in docs if is_validation(d, 0.1) == want_val]
        assert [undo_fim(d) for d in decoded] == expected
        assert manifest["splits"][split]["text_bytes"] == sum(len(d.encode()) for d in expected)
    assert 0.3 < transformed / len(docs) < 0.7
    json.dumps(manifest)
    one = prepare(PrepConfig(inputs=inputs, tokenizer=str(tok_dir), output=str(tmp_path / "one-worker"), seq_len=256,
                             val_fraction=0.1, tail="pad", fim_rate=0.5, fim_spm_rate=0.5, workers=1, show_progress=False,
                             block_bytes=1 << 16))
    for split in ("train", "val"):  # the FIM draw is per document, not per worker: the same bytes with 1 and 2 workers
        assert [sh["sha256"] for sh in one["splits"][split]["shards"]] == [
            sh["sha256"] for sh in manifest["splits"][split]["shards"]], split

    plain = tmp_path / "plain"
    train_byte_bpe(inputs, plain, vocab_size=400)
    with pytest.raises(UserError, match="<fim_prefix>, <fim_middle>, <fim_suffix> are not; train the tokenizer with"):
        prepare(PrepConfig(inputs=inputs, tokenizer=str(plain), output=str(tmp_path / "x"), fim_rate=0.5, show_progress=False))
