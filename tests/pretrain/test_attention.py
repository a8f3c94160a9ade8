"""model.attention: every CPU-capable kernel keeps document masking; the others are refused in one line before training."""
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ATTENTIONS
from pretrain.data import MicroBatch
from pretrain.errors import ConfigError
from pretrain.inputs import IGNORE_INDEX, causal_lm_inputs
from pretrain.model import attention_problem, build_model, build_model_config

EOS = 0


def _per_token_loss(model, inputs: dict, device: str = "cpu") -> torch.Tensor:
    """Loss of predicting token t+1 at position t, ``(T-1,)``; NaN where the label is ignored."""
    t = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    labels = t.pop("labels")
    with torch.no_grad():
        logits = model(**t, use_cache=False).logits[0, :-1].float()
    target = labels[0, 1:]
    loss = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    return torch.where(target == IGNORE_INDEX, torch.nan, loss)


def packed_and_alone() -> tuple[MicroBatch, list[MicroBatch]]:
    """Two documents packed into one sequence, and each alone."""
    rng = np.random.default_rng(0)
    doc_a, doc_b = (np.append(rng.integers(1, 64, n), EOS) for n in (9, 11))
    packed = MicroBatch(np.concatenate([doc_a, doc_b])[None], np.zeros(1), [[0, len(doc_a)]])
    return packed, [MicroBatch(d[None], np.zeros(1), [[0]]) for d in (doc_a, doc_b)]


def assert_document_masked(attention: str, device: str = "cpu", tolerance: float = 1e-4) -> None:
    """Per-token loss of the packed sequence == each document's own (fp32 llama-test under ``attention``)."""
    model = build_model(build_model_config("llama-test", 64, 32, {"eos_token_id": EOS}), seed=0, attention=attention)
    model = model.to(device).eval()
    assert model.config._attn_implementation == attention
    packed, alone = packed_and_alone()

    def loss(mb: MicroBatch) -> torch.Tensor:
        inputs = causal_lm_inputs(mb, document_masking=True)
        return _per_token_loss(model, inputs, device).cpu()

    got, want = loss(packed), [loss(mb) for mb in alone]
    torch.testing.assert_close(got[:9], want[0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got[10:], want[1], rtol=tolerance, atol=tolerance)
    unmasked = _per_token_loss(model, causal_lm_inputs(packed, document_masking=False), device).cpu()
    assert not torch.allclose(unmasked[10:], want[1], atol=1e-3)  # the comparison can fail


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_match_separate_documents_on_cpu(attention):
    assert_document_masked(attention)


def test_sdpa_and_eager_agree():
    packed, _ = packed_and_alone()
    inputs = causal_lm_inputs(packed, document_masking=True)
    losses = [_per_token_loss(build_model(build_model_config("llama-test", 64, 32, {"eos_token_id": EOS}), seed=0,
                                          attention=a).eval(), inputs) for a in ("sdpa", "eager")]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4, equal_nan=True)


def test_kernels_that_cannot_train_here_are_refused_in_one_line():
    assert set(ATTENTIONS) == {"sdpa", "flash_attention_2", "flex_attention", "eager"}
    assert attention_problem("sdpa", "clm", True, "cpu") is None and attention_problem("eager", "mlm", True, "cpu") is None
    flex = attention_problem("flex_attention", "clm", True, "cpu")
    assert flex == "model.attention=flex_attention has no backward on cpu in torch; use sdpa or eager"
    assert attention_problem("flex_attention", "clm", True, "cuda") is None
    flash = attention_problem("flash_attention_2", "clm", True, "cpu")
    if importlib.util.find_spec("flash_attn") is None:
        assert flash == "model.attention=flash_attention_2 needs the flash-attn package (pip install flash-attn)"
    else:
        assert flash == "model.attention=flash_attention_2 needs CUDA (training on cpu); use sdpa"
        assert "document mask" in attention_problem("flash_attention_2", "mlm", True, "cuda")


def test_flex_attention_really_has_no_cpu_backward():
    """The reason flex_attention is refused on CPU, checked against the installed torch."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 1, 16, 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, q, q).sum().backward()


def test_preflight_refuses_flex_on_cpu(tmp_path, tokenizer_dir, prepared_dir):
    from pretrain.config import load_config
    from pretrain.trainer import preflight

    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{path: {prepared_dir}, tokenizer: {tokenizer_dir}}}\nmodel: {{preset: llama-test}}\n")
    with pytest.raises(ConfigError, match="^model.attention=flex_attention has no backward on cpu"):
        preflight(load_config(str(config), ["model.attention=flex_attention"]), device="cpu")
