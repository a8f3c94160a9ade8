import pytest
from transformers import AutoTokenizer

from data_prep.errors import InputError, UserError
from data_prep.tokenizer.folder import EOS_TOKEN, fingerprint, load_tokenizer_info
from data_prep.tokenizer.train import train_byte_bpe


def test_tokenizer_loads_with_autotokenizer_and_round_trips_any_text(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) == 512
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == tok.convert_tokens_to_ids(EOS_TOKEN)
    for text in ["def f(x):\n    return x ** 2\n", "naïve café 東京 🙂 \x00\x7f", "\t  trailing  \n\n"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_same_corpus_gives_identical_tokenizer(tmp_path, corpus_dirs, tokenizer_dir):
    # in-process; every family and from_pretrained in another process:
    # test_tokenizer_families.py::test_same_corpus_gives_a_byte_identical_tokenizer_json_in_another_process
    again = train_byte_bpe(corpus_dirs, tmp_path / "again", vocab_size=512, model_max_length=64)
    assert again.fingerprint == fingerprint(tokenizer_dir)
    info = load_tokenizer_info(tokenizer_dir)
    assert info.vocab_size == 512 and info.eos_token_id is not None


def test_byte_budget_limits_training_text(tmp_path, corpus_dirs):
    import json

    train_byte_bpe(corpus_dirs, tmp_path / "small", vocab_size=300, max_bytes=100_000)
    meta = json.loads((tmp_path / "small" / "lmforge_tokenizer.json").read_text())
    assert 0 < meta["documents"] < 60  # the three packages hold about 100 files


def test_bad_tokenizer_requests_fail_clearly(tmp_path, corpus_dirs):
    with pytest.raises(UserError, match=r"vocab_size 100 is smaller than the byte alphabet \(256\) plus 2 special tokens = 258"):
        train_byte_bpe(corpus_dirs, tmp_path / "t", vocab_size=100)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(InputError, match="empty corpus"):
        train_byte_bpe([str(empty)], tmp_path / "t2", vocab_size=300)
    assert not (tmp_path / "t2").exists()
