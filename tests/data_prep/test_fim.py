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
