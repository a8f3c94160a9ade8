"""Tokenizer evaluation: each metric against an independent count, side by side, and the command line."""
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from data_prep.errors import InputError
from data_prep.reader import iter_documents
from data_prep.tokenizer.evaluation import evaluate_tokenizers, format_table
from tests.data_prep.conftest import PROSE


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Text the tokenizers did not train on: new sentences, an unseen script (runes) and unseen emoji."""
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    texts = ["The old bridge was quiet; the trains waited.", "ᚠᚢᚦᚨᚱᚲ runes here", "party 🥳🪅 time",
             "Les enfants lisent à la bibliothèque.", "def load(path):\n    return json.loads(path.read_text())\n"]
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    return str(path), texts


def test_metrics_match_independent_counts(family_dirs, held_out):
    path, texts = held_out
    report = evaluate_tokenizers([str(family_dirs[f]) for f in ("byte-bpe", "bpe", "wordpiece")], [path])
    text_bytes = sum(len(t.encode()) for t in texts)
    words = sum(len(t.split()) for t in texts)
    assert (report["documents"], report["text_bytes"], report["words"]) == (len(texts), text_bytes, words)
    by_family = {t["family"]: t for t in report["tokenizers"]}
    for family, result in by_family.items():
        tok = AutoTokenizer.from_pretrained(str(family_dirs[family]))
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        tokens = sum(map(len, ids))
        assert result["tokens"] == tokens, family
        assert result["bytes_per_token"] == pytest.approx(text_bytes / tokens)
        assert result["tokens_per_word"] == pytest.approx(tokens / words)
        assert result["vocab_utilisation"] == pytest.approx(len({i for doc in ids for i in doc}) / len(tok))
        unk = sum(doc.count(tok.unk_token_id) for doc in ids) if tok.unk_token_id is not None else 0
        assert result["unk_rate"] == pytest.approx(unk / tokens)
        assert result["encode_mb_per_s"] > 0 and result["tokens_per_s"] > 0
    assert by_family["byte-bpe"]["unk_rate"] == 0 and by_family["byte-bpe"]["round_trip_rate"] == 1.0
    assert by_family["bpe"]["unk_rate"] > 0 and by_family["bpe"]["round_trip_rate"] == pytest.approx(3 / 5)  # runes, emoji
    assert by_family["wordpiece"]["round_trip"] == "none" and by_family["wordpiece"]["round_trip_rate"] is None
    table = format_table(report)
    assert table.splitlines()[0].split() == ["metric", "byte-bpe", "bpe", "wordpiece"]
    assert "round trip" in table and "n/a (none)" in table and "bytes / token" in table


def test_eval_of_a_missing_tokenizer_or_empty_text_fails_clearly(tmp_path, family_dirs):
    with pytest.raises(InputError, match="tokenizer.json: tokenizer file not found"):
        evaluate_tokenizers([str(tmp_path)], [PROSE])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": " "}\n')
    with pytest.raises(InputError, match="empty corpus, no usable document \\(1 rejected\\)"):
        evaluate_tokenizers([str(family_dirs["bpe"])], [str(empty)])


def _lmforge(*args, cwd):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_command_line_train_eval_and_errors(tmp_path, family_dirs):
    proc = _lmforge("tokenizer", "train", "--input", PROSE, "--family", "wordpiece", "--vocab-size", "420",
                    "--output", "tok", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tok: 420 tokens, eos 3, bos 2, pad 0, fingerprint" in proc.stdout
    proc = _lmforge("tokenizer", "eval", "--tokenizer", "tok", "--tokenizer", str(family_dirs["unigram"]),
                    "--input", PROSE, "--json", "eval.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert [t["family"] for t in report["tokenizers"]] == ["wordpiece", "unigram"]
    assert report["documents"] == len(list(iter_documents([PROSE])))
    assert proc.stdout.splitlines()[0].split() == ["metric", "tok", "unigram"]
    for args, line in [
        (("--family", "sentencepiece"), "lmforge: error: unknown tokenizer family 'sentencepiece' (known: byte-bpe, bpe, wordpiece, unigram)"),
        (("--family", "bpe", "--pad-token", "<s>"), "lmforge: error: duplicate special token '<s>': used as bos and pad "
                                                   "(only bos/eos, bos/cls, eos/sep may share a token)"),
    ]:
        proc = _lmforge("tokenizer", "train", "--input", PROSE, "--output", "bad", *args, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert [ln for ln in proc.stderr.splitlines() if ln.startswith("lmforge")] == [line]
        assert not (tmp_path / "bad").exists()
