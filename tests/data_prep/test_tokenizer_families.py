"""The four families: loading, special-token ids and templates, round trips, padding, collators, reproducibility, errors."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from data_prep.errors import UserError
from data_prep.reader import iter_documents
from data_prep.tokenizer.folder import fingerprint, load_tokenizer_info
from data_prep.tokenizer.train import TokenizerTrainConfig, train_tokenizer
from tests.data_prep.conftest import FAMILY_VOCAB, PROSE, RETRAIN_VOCAB, family_configs, retrain_configs

REPO = Path(__file__).resolve().parents[2]

EXPECTED_SPECIALS = {  # role -> (token, id): the family's defaults take the first ids in the family's order
    "byte-bpe": {"eos": ("<|endoftext|>", 0), "bos": ("<|endoftext|>", 0), "pad": ("<|pad|>", 1)},
    "bpe": {"bos": ("<s>", 0), "pad": ("<pad>", 1), "eos": ("</s>", 2), "unk": ("<unk>", 3), "mask": ("<mask>", 4)},
    "wordpiece": {"pad": ("[PAD]", 0), "unk": ("[UNK]", 1), "cls": ("[CLS]", 2), "sep": ("[SEP]", 3),
                  "mask": ("[MASK]", 4), "bos": ("[CLS]", 2), "eos": ("[SEP]", 3)},
    "unigram": {"pad": ("<pad>", 0), "eos": ("</s>", 1), "unk": ("<unk>", 2)},
}


def test_every_family_loads_with_autotokenizer_with_the_right_special_tokens(family_dirs):
    for family, folder in family_dirs.items():
        assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
        tok = AutoTokenizer.from_pretrained(str(folder))
        expected = EXPECTED_SPECIALS[family]
        for role, (token, token_id) in expected.items():
            assert getattr(tok, f"{role}_token") == token, (family, role)
            assert getattr(tok, f"{role}_token_id") == token_id, (family, role)
        unset = {"bos", "eos", "pad", "unk", "mask", "cls", "sep"} - set(expected)
        assert all(getattr(tok, f"{role}_token") is None for role in unset), family
        written = json.loads((folder / "special_tokens_map.json").read_text())
        assert {k: v for k, v in written.items() if k != "additional_special_tokens"} == \
            {f"{role}_token": token for role, (token, _) in expected.items()}, family
        assert len(tok) <= FAMILY_VOCAB and (family == "unigram" or len(tok) == FAMILY_VOCAB), (family, len(tok))
        info = load_tokenizer_info(folder)
        assert (info.eos_token_id, info.pad_token_id, info.vocab_size) == (tok.eos_token_id, tok.pad_token_id, len(tok))
    bpe = AutoTokenizer.from_pretrained(str(family_dirs["bpe"]))
    assert bpe.convert_tokens_to_ids("<|tool|>") == 5 and "<|tool|>" in bpe.all_special_tokens
    assert json.loads((family_dirs["bpe"] / "special_tokens_map.json").read_text())["additional_special_tokens"] == ["<|tool|>"]
    assert AutoTokenizer.from_pretrained(str(family_dirs["byte-bpe"])).model_max_length == 128


def test_post_processors_put_special_tokens_in_place(family_dirs):
    wp = AutoTokenizer.from_pretrained(str(family_dirs["wordpiece"]))
    enc = wp("a", "b")
    assert wp.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "a", "[SEP]", "b", "[SEP]"]
    assert enc["token_type_ids"] == [0, 0, 0, 1, 1]
    assert wp.decode(wp("Café Über")["input_ids"], skip_special_tokens=True) == "cafe uber"  # lowercase + accents
    bpe = AutoTokenizer.from_pretrained(str(family_dirs["bpe"]))
    ids = bpe("the river")["input_ids"]
    assert ids[0] == bpe.bos_token_id and ids[-1] == bpe.eos_token_id and bpe.bos_token_id not in ids[1:-1]
    uni = AutoTokenizer.from_pretrained(str(family_dirs["unigram"]))
    ids = uni("the river")["input_ids"]
    assert ids[-1] == uni.eos_token_id and uni.eos_token_id not in ids[:-1]
    gpt = AutoTokenizer.from_pretrained(str(family_dirs["byte-bpe"]))
    assert gpt("the river")["input_ids"] == gpt("the river", add_special_tokens=False)["input_ids"]  # GPT-2 adds nothing


def _arbitrary_texts() -> list[str]:
    rng = random.Random(0)
    code_points = [c for c in range(1, 0x30000) if not 0xD800 <= c <= 0xDFFF]
    return [
        bytes(range(256)).decode("latin-1"),  # every byte value as a character
        "".join(chr(rng.choice(code_points)) for _ in range(400)),
        "emoji 🙂🚀👩‍👩‍👧 and flags 🇯🇵, CJK 漢字かなカナ한국어, RTL עברית العربية",
        "\x00\x01\x7f control \t\r\n  trailing spaces   ",
    ]


def test_byte_bpe_round_trips_arbitrary_text_without_unk(family_dirs):
    tok = Tokenizer.from_file(str(family_dirs["byte-bpe"] / "tokenizer.json"))
    assert AutoTokenizer.from_pretrained(str(family_dirs["byte-bpe"])).unk_token_id is None
    for text in _arbitrary_texts():
        ids = tok.encode(text, add_special_tokens=False).ids
        assert max(ids) < tok.get_vocab_size()
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_bpe_and_unigram_round_trip_normalized_text_of_their_alphabet(family_dirs, family_corpus):
    docs = [d.text for d in iter_documents(family_corpus)]
    for family in ("bpe", "unigram"):
        tok = Tokenizer.from_file(str(family_dirs[family] / "tokenizer.json"))
        unk = tok.token_to_id(EXPECTED_SPECIALS[family]["unk"][0])
        for text in docs:
            ids = tok.encode(text, add_special_tokens=False).ids
            assert unk not in ids, (family, text[:40])
            assert tok.decode(ids, skip_special_tokens=False) == tok.normalizer.normalize_str(text), (family, text[:40])
        assert unk in tok.encode("ᚠᚢᚦ", add_special_tokens=False).ids  # runes never seen: unk, so no promise there


def test_padding_side_and_both_language_modeling_collators(family_dirs):
    torch.manual_seed(0)
    left = AutoTokenizer.from_pretrained(str(family_dirs["bpe"]))
    batch = left(["a", "the river was quiet"], padding=True)["input_ids"]
    assert left.padding_side == "left" and batch[0][0] == left.pad_token_id and batch[1][0] != left.pad_token_id
    gpt = AutoTokenizer.from_pretrained(str(family_dirs["byte-bpe"]))
    assert gpt.padding_side == "right"
    docs = [gpt("a" + gpt.eos_token)["input_ids"], gpt("the river was quiet" + gpt.eos_token)["input_ids"]]
    clm = DataCollatorForLanguageModeling(gpt, mlm=False)([{"input_ids": d} for d in docs])
    assert clm["input_ids"][0, -1] == gpt.pad_token_id and clm["labels"][0, -1] == -100
    assert (clm["labels"][1] == clm["input_ids"][1]).all()  # eos stays a label: pad is not eos
    assert (clm["labels"] == gpt.eos_token_id).sum() == 2
    for family in ("wordpiece", "bpe"):
        tok = AutoTokenizer.from_pretrained(str(family_dirs[family]))
        features = [tok(t) for t in ("the river was quiet in the morning", "a small library", "numbers like 2048")]
        mlm = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.5)(features)
        special = torch.isin(mlm["input_ids"], torch.tensor(tok.all_special_ids)) & (mlm["input_ids"] != tok.mask_token_id)
        assert (mlm["labels"][special] == -100).all(), family
        assert (mlm["input_ids"] == tok.mask_token_id).any() and (mlm["labels"] != -100).any(), family


_TRAIN_CONFIGS = """
import json, sys
from data_prep.tokenizer.train import TokenizerTrainConfig, train_tokenizer
for config in json.load(open(sys.argv[1])):
    train_tokenizer(TokenizerTrainConfig(**config))
"""


def test_same_corpus_gives_a_byte_identical_tokenizer_json_in_another_process(
        tmp_path, family_corpus, family_dirs, pretrained_sources, retrained_dirs):
    # tokenizers' trainers iterate hash maps whose keys are random per map and per process (Rust's
    # ahash, Python's string hashes), so the second run is another process with other hash seeds.
    again = {**family_configs(family_corpus, tmp_path / "families"),
             **{f"from {k}": v for k, v in retrain_configs(pretrained_sources, tmp_path / "retrained").items()}}
    here = {**family_dirs, **{f"from {k}": v for k, v in retrained_dirs.items()}}
    assert len(again) == len(here) == 10
    (tmp_path / "configs.json").write_text(json.dumps(list(again.values())))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _TRAIN_CONFIGS, str(tmp_path / "configs.json")], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    differ = [name for name, config in again.items() if fingerprint(config["output"]) != fingerprint(here[name])]
    assert differ == [], f"tokenizer.json differs between two runs for {differ}"


def test_unigram_scores_are_log_frequencies_of_the_viterbi_counts(family_dirs, family_corpus):
    import math

    from data_prep.tokenizer.corpus import CorpusText
    from data_prep.tokenizer.unigram import UNUSED_PIECE_COUNT, rescore_unigram, viterbi_counts

    tok = Tokenizer.from_file(str(family_dirs["unigram"] / "tokenizer.json"))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    assert vocab[:3] == [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0]]
    assert [p for p, _ in vocab[3:]] == sorted(p for p, _ in vocab[3:])  # ids by text
    text = CorpusText(family_corpus)
    counts = viterbi_counts(tok, text.batches())
    assert counts[:3].sum() == 0 and (counts == 0).sum() > 3  # special tokens never counted; some pieces unused
    rescore_unigram(tok, text.batches())
    rescored = json.loads(tok.to_str())["model"]["vocab"]
    total = int(counts[3:].sum())
    assert rescored[:3] == vocab[:3] and [p for p, _ in rescored] == [p for p, _ in vocab]
    assert [s for _, s in rescored[3:]] == [math.log(int(c) or UNUSED_PIECE_COUNT) - math.log(total) for c in counts[3:]]


def test_bad_requests_fail_with_one_clear_line(tmp_path, family_corpus):
    def fails(match, **kw):
        kw = {"inputs": [PROSE], "output": str(tmp_path / "t"), **kw}
        with pytest.raises(UserError, match=match) as err:
            train_tokenizer(TokenizerTrainConfig(**kw))
        assert "\n" not in str(err.value)
        assert not (tmp_path / "t").exists()
        return str(err.value)

    fails(r"unknown tokenizer family 'sentencepiece' \(known: byte-bpe, bpe, wordpiece, unigram\)", family="sentencepiece")
    fails(r"duplicate special token '<pad>': used as eos and pad", family="bpe", special_tokens={"eos": "<pad>"})
    fails(r"duplicate special token 'X': listed twice", family="wordpiece", extra_special_tokens=["X", "X"])
    fails(r"family byte-bpe has no unk token by design", special_tokens={"unk": "<unk>"})
    fails(r"family wordpiece needs an unk token", family="wordpiece", special_tokens={"unk": None})
    msg = fails(r"vocab_size 40 is smaller than the corpus alphabet \(\d+ symbols after bpe normalization\) "
                r"plus 5 special tokens = \d+", family="bpe", vocab_size=40)
    need = int(msg.rsplit("= ", 1)[1])
    assert train_tokenizer(TokenizerTrainConfig(inputs=[PROSE], output=str(tmp_path / "fits"), family="bpe",
                                                vocab_size=need)).vocab_size == need  # the number is the real minimum
    fails(r"vocab_size 40 is smaller than the corpus alphabet \(\d+ symbols after unigram normalization\) "
          r"plus 3 special tokens", family="unigram", vocab_size=40)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="output exists and is not a tokenizer folder"):
        train_tokenizer(TokenizerTrainConfig(inputs=[PROSE], output=str(tmp_path / "notes")))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_from_pretrained_retrains_the_source_pipeline(retrained_dirs, pretrained_sources):
    out = retrained_dirs["wordpiece"]
    tok = AutoTokenizer.from_pretrained(str(out))
    assert load_tokenizer_info(out).vocab_size == len(tok) == RETRAIN_VOCAB and tok.padding_side == "left"
    assert fingerprint(out) != fingerprint(pretrained_sources["wordpiece"])
    enc = tok("a", "b")
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "a", "[SEP]", "b", "[SEP]"]
    assert enc["token_type_ids"] == [0, 0, 0, 1, 1]
    assert (tok.pad_token_id, tok.cls_token_id, tok.mask_token_id) == (0, 2, 4)
    meta = json.loads((out / "lmforge_tokenizer.json").read_text())
    assert (meta["family"], meta["from_pretrained"], meta["source_model_type"]) == ("wordpiece", str(pretrained_sources["wordpiece"]), "WordPiece")
    assert (out / "special_tokens_map.json").is_file()
    # the sorted seed symbols (##c, c</w>) are plain vocabulary again, not special tokens
    for name, seed in (("wordpiece", "##a"), ("bpe-affixes", "a</w>")):
        tok = AutoTokenizer.from_pretrained(str(retrained_dirs[name]))
        assert seed in tok.get_vocab() and seed not in tok.all_special_tokens, name
        assert json.loads((retrained_dirs[name] / "tokenizer.json").read_text())["added_tokens"] == \
            json.loads((pretrained_sources[name] / "tokenizer.json").read_text())["added_tokens"], name
    affixes = AutoTokenizer.from_pretrained(str(retrained_dirs["bpe-affixes"]))
    pieces = affixes.tokenize("the river")
    assert "".join(p.removeprefix("##").removesuffix("</w>") for p in pieces) == "theriver" and len(affixes) == RETRAIN_VOCAB
    assert pieces[-1].endswith("</w>") and any(p.startswith("##") for p in pieces), pieces
    unigram = json.loads((retrained_dirs["unigram"] / "tokenizer.json").read_text())["model"]["vocab"]
    assert [p for p, _ in unigram[3:]] == sorted(p for p, _ in unigram[3:])
