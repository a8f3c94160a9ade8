"""Token dtypes, MLM framing, tail padding, and a very large document in bounded memory."""
import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from data_prep.encode import Encoder, EncodeSpec, split_points
from data_prep.errors import UserError
from data_prep.prep import PrepConfig, prepare
from data_prep.reader import iter_documents
from data_prep.shards import ShardReader


def _word_tokenizer(path, words, **special):
    """A real word-level tokenizer saved the way transformers saves any fast tokenizer."""
    specials = [t for t in special.values()]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if "cls_token" in special:
        cls, sep = special["cls_token"], special["sep_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(path))
    return Tokenizer.from_file(str(path / "tokenizer.json")), vocab


def _docs_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def test_large_vocabulary_uses_uint32_and_padding_is_marked(tmp_path):
    tok, vocab = _word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(70_000)], unk_token="<unk>", eos_token="<eos>")
    docs = ["w1 w65535 w65536", "w69999 w70000 w2"]  # w70000 is unknown
    m = prepare(PrepConfig(inputs=[_docs_jsonl(tmp_path / "c.jsonl", docs)], tokenizer=str(tmp_path / "tok"),
                           output=str(tmp_path / "out"), seq_len=5, val_fraction=0.0, tail="pad", workers=1, show_progress=False))
    eos, unk = vocab["<eos>"], vocab["<unk>"]
    assert m["token_dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 70_002
    r = ShardReader(tmp_path / "out", "train")
    assert r[0].dtype == np.uint32
    assert r.batch([0, 1]).tolist() == [[vocab["w1"], 65537, 65538, eos, 70_001], [unk, vocab["w2"], eos, eos, eos]]
    assert [r.document_starts(i) for i in range(2)] == [[0, 4], []]
    assert r.batch_num_tokens([0, 1]).tolist() == [5, 3]  # pad id falls back to eos; num_tokens tells them apart
    c = m["counts"]
    assert (c["tokens"], c["sequences"], c["tokens_padded"], c["tokens_dropped"]) == (8, 2, 2, 0)
    assert m["pad_token_id"] == eos and m["tail"] == "pad"


def test_mlm_packs_with_the_tokenizers_post_processor(tmp_path):
    words = "a b c d e f g h i j k".split()
    tok, vocab = _word_tokenizer(tmp_path / "tok", words, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                 sep_token="[SEP]", mask_token="[MASK]")
    docs = ["a b c", "d e", "f g h i j k"]
    m = prepare(PrepConfig(inputs=[_docs_jsonl(tmp_path / "c.jsonl", docs)], tokenizer=str(tmp_path / "tok"),
                           output=str(tmp_path / "out"), seq_len=8, val_fraction=0.0, objective="mlm", tail="pad",
                           workers=1, show_progress=False))
    assert m["objective"] == "mlm" and m["sequence_prefix_ids"] == [vocab["[CLS]"]] and m["sequence_suffix_ids"] == [vocab["[SEP]"]]
    r = ShardReader(tmp_path / "out", "train")
    rows = [tok.decode(r[i].tolist(), skip_special_tokens=False).split() for i in range(len(r))]
    assert rows == ["[CLS] a b c [SEP] d e [SEP]".split(), "[CLS] [SEP] f g h i j [SEP]".split(),
                    "[CLS] k [SEP] [SEP] [PAD] [PAD] [PAD] [PAD]".split()]
    assert r[0].tolist() == tok.encode("a b c [SEP] d e").ids  # exactly the post-processor's framing
    assert [r.document_starts(i) for i in range(3)] == [[1, 5], [2], []]
    assert r.batch_num_tokens(range(3)).tolist() == [8, 8, 4]
    c = m["counts"]
    assert c["tokens"] + c["tokens_framing"] + c["tokens_padded"] == c["sequences"] * 8 + c["tokens_dropped"]
    with pytest.raises(UserError, match="post-processor adds no special token"):
        _word_tokenizer(tmp_path / "plain", words, unk_token="[UNK]", pad_token="[PAD]")
        prepare(PrepConfig(inputs=[str(tmp_path / "c.jsonl")], tokenizer=str(tmp_path / "plain"), output=str(tmp_path / "o2"),
                           objective="mlm", workers=1, show_progress=False))


def test_long_documents_encode_in_pieces_to_the_same_ids(tokenizer_dir, corpus_dirs):
    text = "".join(d.text for d in iter_documents(corpus_dirs))[:400_000]
    cuts = split_points(text, 5000)
    assert len(cuts) > 80 and all(0 < b - a <= 5000 for a, b in zip(cuts, cuts[1:]))
    tok_file = str(tokenizer_dir / "tokenizer.json")
    enc = Encoder(EncodeSpec(tok_file, "text", 0.0, (), (0,), "uint16", max_piece_chars=5000, encode_batch_chars=20_000))
    (ids,) = enc._encode_texts([text])
    assert ids.tolist() == Tokenizer.from_file(tok_file).encode(text, add_special_tokens=False).ids


_BIG_DOC_SCRIPT = """
import json, resource, sys
from data_prep.prep import PrepConfig, prepare
from data_prep.tokenizer.folder import load_tokenizer_info
load_tokenizer_info(sys.argv[2])  # baseline: transformers' AutoTokenizer alone takes ~250 MB
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = prepare(PrepConfig(inputs=[sys.argv[1]], tokenizer=sys.argv[2], output=sys.argv[3], seq_len=256, val_fraction=0.0,
                       workers=1, show_progress=False))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (peak - base) / 1024, "tokens": m["counts"]["tokens"], "documents": m["counts"]["documents"]}))
"""


def test_a_huge_single_line_document_is_tokenized_in_bounded_memory(tmp_path, tokenizer_dir, corpus_dirs):
    text = "".join(d.text for d in iter_documents(corpus_dirs))
    text = (text * (8_000_000 // len(text) + 1))[:8_000_000]  # 8 MB on one jsonl line
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    proc = subprocess.run([sys.executable, "-c", _BIG_DOC_SCRIPT, str(tmp_path / "big.jsonl"), str(tokenizer_dir), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["documents"] == 1 and result["tokens"] > 3_000_000
    # reading, decoding and parsing the line cost a few times its 8 MB; encoding it whole costs ~1.3 GB
    assert result["growth_mb"] < 200, result
