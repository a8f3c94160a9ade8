import copy

import pytest

from data_prep.shards import read_manifest
from data_prep.tokenizer.folder import load_tokenizer_info
from pretrain.checks import check_consistency
from pretrain.config import load_config
from pretrain.errors import ConsistencyError
from pretrain.model import build_model_config, padded_vocab_size
from pretrain.trainer import preflight


def _config(tok, rows, seq_len=64, **overrides):
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    return build_model_config("llama-test", rows, seq_len, ids, overrides)


def test_consistent_setup_passes_and_embedding_is_padded(tokenizer_dir, prepared_dir):
    cfg = load_config(None, [f"data.path={prepared_dir}", f"data.tokenizer={tokenizer_dir}", "model.preset=llama-test"])
    tok, model_config, seq_len = preflight(cfg)
    assert seq_len == 64 and model_config.vocab_size == padded_vocab_size(tok.vocab_size) == 512
    assert padded_vocab_size(513) == 576


def test_each_disagreement_is_refused_with_numbers(tokenizer_dir, prepared_dir):
    tok = load_tokenizer_info(tokenizer_dir)
    manifest = read_manifest(prepared_dir)
    with pytest.raises(ConsistencyError, match=r"has 512 tokens but the model embedding has 256 rows"):
        check_consistency(tok, manifest, _config(tok, 256), 64)
    with pytest.raises(ConsistencyError, match=r"seq_len=128 differs from the prepared data's seq_len=64"):
        check_consistency(tok, manifest, _config(tok, 512, 128), 128)
    with pytest.raises(ConsistencyError, match=r"seq_len=64 exceeds the model's max_position_embeddings=32"):
        check_consistency(tok, manifest, _config(tok, 512, max_position_embeddings=32), 64)
    other = copy.deepcopy(manifest)
    other["tokenizer"]["fingerprint"] = "0" * 64
    with pytest.raises(ConsistencyError, match="data was tokenized by tokenizer 000000000000"):
        check_consistency(tok, other, _config(tok, 512), 64)
    other["objective"] = "mlm"
    with pytest.raises(ConsistencyError, match="data objective 'mlm' does not match the model objective 'clm'"):
        check_consistency(tok, other, _config(tok, 512), 64)
    bad_ids = tok.__class__(**{**tok.__dict__, "eos_token_id": 9999})
    with pytest.raises(ConsistencyError, match=r"eos_token_id=9999 is outside the embedding \[0, 512\)"):
        check_consistency(bad_ids, manifest, _config(tok, 512), 64)
