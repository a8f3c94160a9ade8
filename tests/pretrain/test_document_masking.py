"""Document masking: a packed sequence of two documents trains exactly like the two documents alone."""
import numpy as np
import torch
import torch.nn.functional as F

from pretrain.data import MicroBatch
from pretrain.inputs import IGNORE_INDEX, causal_lm_inputs
from pretrain.model import build_model, build_model_config

EOS = 0


def _per_token_loss(model, inputs: dict) -> torch.Tensor:
    """Loss of predicting token t+1 at position t, ``(T-1,)``; NaN where the label is ignored."""
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    labels = t.pop("labels")
    with torch.no_grad():
        logits = model(**t, use_cache=False).logits[0, :-1]
    target = labels[0, 1:]
    loss = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    return torch.where(target == IGNORE_INDEX, torch.nan, loss)


def test_packed_documents_match_separate_documents():
    model = build_model(build_model_config("llama-test", 64, 32, {"eos_token_id": EOS}), seed=0).eval()
    rng = np.random.default_rng(0)
    doc_a = np.append(rng.integers(1, 64, 9), EOS)
    doc_b = np.append(rng.integers(1, 64, 11), EOS)
    packed = MicroBatch(np.concatenate([doc_a, doc_b])[None], np.zeros(1), [[0, len(doc_a)]])
    alone = [MicroBatch(d[None], np.zeros(1), [[0]]) for d in (doc_a, doc_b)]

    inputs = causal_lm_inputs(packed, document_masking=True)
    assert inputs["position_ids"][0].tolist() == list(range(10)) + list(range(12))
    assert inputs["labels"][0, 10] == IGNORE_INDEX  # EOS of A -> first token of B is not trained
    got = _per_token_loss(model, inputs)
    want_a, want_b = (_per_token_loss(model, causal_lm_inputs(mb, document_masking=True)) for mb in alone)
    torch.testing.assert_close(got[:9], want_a, rtol=1e-5, atol=1e-5)
    assert torch.isnan(got[9])
    torch.testing.assert_close(got[10:], want_b, rtol=1e-5, atol=1e-5)

    # without masking, B's tokens see A: the losses differ, so the test above can fail
    unmasked = _per_token_loss(model, causal_lm_inputs(packed, document_masking=False))
    assert not torch.allclose(unmasked[10:], want_b, atol=1e-3)
