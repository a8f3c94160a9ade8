"""The causal-LM training loss without the full logits: the output projection (lm_head) and the
cross-entropy fused and computed over chunks of tokens.

transformers computes ``logits = lm_head(h)`` for every token, ``(B, T, V)``, then upcasts them to
float32 for the loss: at micro batch 8, seq_len 2048 and a 128k vocabulary that is 8.6 GB of float32
logits, plus their gradient, the largest activation of a training step. Here the loss and both
gradients (hidden states and lm_head weight) are computed in the forward pass, chunk by chunk, so
at most ``(chunk_tokens, V)`` float32 logits exist at a time; backward only scales the stored
gradients. The technique is Liger-Kernel's ``FusedLinearCrossEntropy`` (Hsu et al., 2024,
arXiv:2410.10989) and "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024,
arXiv:2411.09009), written here in plain torch so that it runs on CPU and GPU alike. On CPU it is
also faster (less memory traffic): llama-tiny at seq_len 512 on 2 ranks trained 1.13x the tokens/s of
the model's own loss (6,390 against 5,660, medians of 3 rounds; ``bench/bench_train.py``, 2026-12-03), a
gain that shrinks with the head's share of the model's FLOPs.

The arithmetic follows transformers' path: logits in the weights' dtype, log-softmax in float32,
``d loss / d logits = (softmax - onehot) / n_valid`` cast back to the weights' dtype for the two
gradient matmuls. Gradients are kept in float32 until backward multiplies them by the incoming
gradient (DeepSpeed's loss scale and 1/gradient-accumulation), so fp16 loss scaling works as usual.

Used for training steps only (evaluation and the export probe run the model's own forward), on
models whose head is a plain bias-free linear layer (:data:`FUSED_LOSS_MODEL_TYPES`), at ZeRO
stages 0-2 (at stage 3 the lm_head weight is partitioned outside its module's forward).
"""
from __future__ import annotations

import types

import torch

from pretrain.inputs import IGNORE_INDEX

FUSED_LOSS_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
"""transformers model types whose causal-LM head is ``lm_head(base_model(...).last_hidden_state)``, no
bias, no logit scaling or soft-capping."""


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``mean cross_entropy(hidden @ weight.T, labels)`` over non-ignored labels, without the full logits.

    Inputs: ``hidden (N, H)`` and ``weight (V, H)`` of one float dtype, ``labels (N,)`` int64 (``-100``:
    no loss), ``chunk_tokens`` (int, tokens per chunk). Returns a float32 scalar (nats per token; 0 when
    every label is ignored). Memory beyond the inputs: ``(chunk_tokens, V)`` float32 logits, and the
    float32 gradients ``(N, H)`` and ``(V, H)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int):
        valid = labels != IGNORE_INDEX
        scale = 1.0 / max(int(valid.sum()), 1)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, v = hidden[start:start + chunk_tokens], valid[start:start + chunk_tokens]
            y = torch.where(v, labels[start:start + chunk_tokens], 0)
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, y[:, None]).squeeze(1)) * v).sum()
            # in place, logits -> d loss / d logits = (softmax - onehot) * scale on valid rows, 0 elsewhere
            logits.sub_(lse[:, None]).exp_()
            logits.scatter_add_(1, y[:, None], torch.full((len(y), 1), -1.0, device=logits.device))
            logits.mul_((v.float() * scale)[:, None])
            grad_logits = logits.to(hidden.dtype)
            grad_hidden[start:start + chunk_tokens] = grad_logits @ weight
            grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss).to(ctx.dtypes[0]), (grad_weight * grad_loss).to(ctx.dtypes[1]), None, None


def fused_loss_unsupported(model, objective: str, zero_stage: int) -> str | None:
    """Why the chunked loss cannot replace ``model``'s own; None when it can."""
    head = model.get_output_embeddings()
    model_type = getattr(model.config, "model_type", "?")
    if objective != "clm":
        return f"objective {objective} (causal LM only)"
    if zero_stage >= 3:
        return "ZeRO stage 3 partitions the lm_head weight outside its forward"
    if model_type not in FUSED_LOSS_MODEL_TYPES:
        return f"model type {model_type} (supported: {', '.join(sorted(FUSED_LOSS_MODEL_TYPES))})"
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return "the output layer is not a bias-free linear layer"
    return None


def enable_fused_loss(model, chunk_tokens: int) -> None:
    """Make ``model``'s training forward compute its loss with :class:`ChunkedLinearCrossEntropy`.

    In place, on this instance only: a forward with ``labels`` (``(B, T)`` int64, the inputs; shifted
    inside, as transformers does) in training mode with gradients enabled returns an output whose
    ``loss`` is the fused loss and whose ``logits`` is None; any other call (evaluation, generation,
    the export probe) runs the model's own forward. Parameters, state dict and hooks are unchanged.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    own_forward = model.forward

    def forward(self, input_ids=None, labels=None, **kwargs):
        if labels is None or not self.training or not torch.is_grad_enabled():
            return own_forward(input_ids=input_ids, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        hidden = self.base_model(input_ids=input_ids, **kwargs).last_hidden_state
        loss = ChunkedLinearCrossEntropy.apply(hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                                               self.get_output_embeddings().weight,
                                               labels[:, 1:].reshape(-1), chunk_tokens)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
