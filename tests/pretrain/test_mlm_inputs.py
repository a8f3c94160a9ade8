"""Dynamic MLM masking statistics on a real WordPiece tokenizer: 15% selected, 80/10/10, specials never, whole words."""
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from data_prep.reader import iter_documents
from pretrain.data import MicroBatch
from pretrain.inputs import IGNORE_INDEX, MaskedLMInputs, word_start_table


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory, corpus_dirs):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator((d.text for d in iter_documents(corpus_dirs[:1])),
                            trainers.WordPieceTrainer(vocab_size=800, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    out = tmp_path_factory.mktemp("wp") / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(out))
    return str(out)


def _batch(tok, rows=64, seq_len=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(len(tok.all_special_ids), len(tok), size=(rows, seq_len))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    return MicroBatch(ids, np.arange(rows), [[0]] * rows)


def test_masking_statistics_and_special_tokens(wordpiece_dir):
    mlm = MaskedLMInputs(wordpiece_dir)
    tok = mlm.tokenizer
    np.random.seed(0)
    mb = _batch(tok)
    out = mlm(mb)
    selected = out["labels"] != IGNORE_INDEX
    assert not selected[:, 0].any() and not selected[:, -1].any()  # [CLS] / [SEP] never masked
    assert (out["labels"][selected] == mb.input_ids[selected]).all()
    frac = selected[:, 1:-1].mean()
    assert 0.14 < frac < 0.16
    masked = out["input_ids"][selected] == tok.mask_token_id
    kept = out["input_ids"][selected] == mb.input_ids[selected]
    assert 0.77 < masked.mean() < 0.83 and 0.08 < kept.mean() < 0.12  # random replacement: the other ~10%
    assert (out["attention_mask"] == 1).all()


def test_padding_is_never_a_label_and_not_attended(wordpiece_dir):
    mlm = MaskedLMInputs(wordpiece_dir, probability=0.5)
    mb = _batch(mlm.tokenizer, rows=8, seq_len=32)
    mb = MicroBatch(mb.input_ids, mb.sample_indices, mb.document_starts, np.full(8, 20))
    out = mlm(mb)
    assert (out["labels"][:, 20:] == IGNORE_INDEX).all() and (out["attention_mask"][:, 20:] == 0).all()
    assert (out["labels"][:, 1:19] != IGNORE_INDEX).any()


def test_whole_word_masking_masks_every_piece_of_a_word(wordpiece_dir):
    mlm = MaskedLMInputs(wordpiece_dir, whole_word_mask=True)
    tok = mlm.tokenizer
    starts = word_start_table(tok)
    assert not starts[tok.convert_tokens_to_ids([t for t in tok.get_vocab() if t.startswith("##")][0])]
    np.random.seed(1)
    mb = _batch(tok, rows=32, seq_len=64)
    selected = mlm(mb)["labels"] != IGNORE_INDEX
    word = np.cumsum(starts[mb.input_ids], axis=1)
    for row in range(len(selected)):
        for w in np.unique(word[row][selected[row]]):
            members = (word[row] == w) & ~np.isin(mb.input_ids[row], tok.all_special_ids)
            assert selected[row][members].all()


@pytest.mark.parametrize("preset, overrides", [
    ("bert-test", {}),
    ("roberta-base", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4}),
    # local_attention 8: a sliding window of 4 tokens, shorter than the documents, so the window matters
    ("modernbert-base", {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                         "local_attention": 8}),
])
def test_document_masked_mlm_packed_equals_documents_alone(wordpiece_dir, preset, overrides):
    """ModernBERT's recipe: a packed batch of two documents gives the same per-token MLM loss as each alone."""
    import torch
    import torch.nn.functional as F

    from pretrain.model import build_model, build_model_config

    np.random.seed(3)
    torch.manual_seed(3)
    mlm0 = MaskedLMInputs(wordpiece_dir)
    tok = mlm0.tokenizer
    special = {"pad_token_id": tok.pad_token_id, "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
               "mask_token_id": tok.mask_token_id}
    config = build_model_config(preset, len(tok), 64, special, overrides)
    model = build_model(config, seed=0).eval()
    mlm = MaskedLMInputs.for_model(wordpiece_dir, config, True, 0.3, 0.8, 0.1, False)
    assert (mlm.sliding_window is not None) == (preset == "modernbert-base")
    rng = np.random.default_rng(1)
    docs = [np.concatenate([[tok.cls_token_id], rng.integers(5, len(tok), n), [tok.sep_token_id]]) for n in (13, 17)]
    packed = np.concatenate(docs)[None]
    inputs = mlm(MicroBatch(packed, np.zeros(1), [[0, len(docs[0])]]))
    assert inputs["position_ids"][0, len(docs[0])] == inputs["position_ids"][0, 0]

    def per_token_loss(ids, labels, **extra):
        t = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in extra.items()}
        if isinstance(t.get("attention_mask"), dict):
            t["attention_mask"] = {k: torch.from_numpy(v) for k, v in t["attention_mask"].items()}
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids), **t).logits[0]
        target = torch.from_numpy(labels[0])
        loss = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
        return torch.where(target == IGNORE_INDEX, torch.nan, loss)

    extra = {k: inputs[k] for k in ("attention_mask", "position_ids")}
    got = per_token_loss(inputs["input_ids"], inputs["labels"], **extra)
    cut = len(docs[0])
    want = torch.cat([per_token_loss(inputs["input_ids"][:, a:b], inputs["labels"][:, a:b])
                      for a, b in ((0, cut), (cut, packed.shape[1]))])
    assert (inputs["labels"] != IGNORE_INDEX).sum() >= 4  # some tokens are trained
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    if preset == "modernbert-base":  # the window is real: without it the packed loss differs
        wrong = per_token_loss(inputs["input_ids"], inputs["labels"], attention_mask=inputs["attention_mask"]["full_attention"],
                               position_ids=inputs["position_ids"])
        assert not torch.allclose(wrong, want, equal_nan=True)
