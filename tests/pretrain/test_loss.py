"""The fused chunked lm_head + cross-entropy (pretrain.loss) against PyTorch's and transformers' own loss."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pretrain.loss import IGNORE_INDEX, ChunkedLinearCrossEntropy, enable_fused_loss, fused_loss_unsupported
from pretrain.model import build_model, build_model_config

SPECIAL = {"eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 1}


def test_matches_cross_entropy_in_float32_with_ignored_labels_and_uneven_chunks():
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 50
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 5, 36]] = IGNORE_INDEX
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX)
    ref_gh, ref_gw = torch.autograd.grad(3 * ref, (hidden, weight))  # a scale, as DeepSpeed's loss scale / GAS
    got = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, 8)  # 5 chunks, the last of 5 tokens
    got_gh, got_gw = torch.autograd.grad(3 * got, (hidden, weight))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert got_gh[[0, 5, 36]].abs().max() == 0  # ignored positions get no gradient
    all_ignored = ChunkedLinearCrossEntropy.apply(hidden, weight, torch.full((n,), IGNORE_INDEX), 8)
    assert all_ignored.item() == 0.0


def _model(preset="llama-test", dtype=torch.bfloat16):
    config = build_model_config(preset, 256, 64, SPECIAL, {})
    return build_model(config, seed=0).to(dtype).train()


def test_model_training_forward_matches_transformers_loss_and_gradients_in_bf16():
    ref = _model()
    fused = copy.deepcopy(ref)
    enable_fused_loss(fused, chunk_tokens=48)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 256, (3, 64), generator=g)
    labels = ids.clone()
    labels[0, 40:] = IGNORE_INDEX  # tail padding of a packed row
    position_ids = torch.cat([torch.arange(30), torch.arange(34)]).repeat(3, 1)  # two documents per row
    inputs = dict(input_ids=ids, labels=labels, position_ids=position_ids, use_cache=False)
    out_ref, out_fused = ref(**inputs), fused(**inputs)
    assert out_fused.logits is None  # the (B, T, V) logits were never built
    torch.testing.assert_close(out_fused.loss, out_ref.loss.float(), rtol=2e-3, atol=0)
    out_ref.loss.backward()
    out_fused.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert q.grad is not None and q.grad.dtype == p.dtype, name
        err = (q.grad.float() - p.grad.float()).abs().max() / p.grad.float().abs().max()
        assert err < 0.02, f"{name}: relative gradient difference {err:.3g}"  # a few bf16 ulps
    fused.eval()
    with torch.no_grad():  # evaluation and the export probe run the model's own forward
        torch.testing.assert_close(fused(**inputs).logits, ref.eval()(**inputs).logits, rtol=0, atol=0)


def test_where_it_applies():
    llama, gpt2, bert = _model(), _model("gpt2-small", torch.float32), _model("bert-test", torch.float32)
    assert fused_loss_unsupported(llama, "clm", 2) is None and fused_loss_unsupported(gpt2, "clm", 0) is None
    assert fused_loss_unsupported(llama, "clm", 3) == "ZeRO stage 3 partitions the lm_head weight outside its forward"
    assert fused_loss_unsupported(bert, "mlm", 1) == "objective mlm (causal LM only)"
    assert fused_loss_unsupported(bert, "clm", 1).startswith("model type bert (supported: gpt2, llama")


@pytest.mark.parametrize("chunk_tokens", [1, 10_000])
def test_chunk_size_does_not_change_the_loss(chunk_tokens):
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(20, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (20,), generator=g)
    ref = F.cross_entropy(hidden @ weight.t(), labels)
    torch.testing.assert_close(ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens), ref)
