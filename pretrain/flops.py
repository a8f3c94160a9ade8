"""Training FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per token (forward + backward) = 6 N + 12 L H Q T, with N the parameters that take part in
matrix multiplies (all but the input embedding lookup), L layers, H attention heads, Q head
dimension, T the sequence length: PaLM, Chowdhery et al. 2022, appendix B (the formula nanoGPT's
``estimate_mfu`` uses). MFU = achieved FLOP/s / (world size x peak FLOP/s of one device).
"""
from __future__ import annotations

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
"""Dense bf16 tensor-core peak per device, TFLOP/s (vendor data sheets, SXM parts)."""


def flops_per_token(config, seq_len: int) -> float:
    """6 N + 12 L H Q T training FLOPs per token (see the module docstring) of ``config``'s model, counted
    on the meta device (no weights are materialised: at ZeRO-3 no rank holds the whole model)."""
    from pretrain.model import hidden_size, meta_model, num_layers

    model = meta_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or hidden_size(config) // heads
    return 6.0 * (n_params - embedding) + 12.0 * num_layers(config) * heads * head_dim * seq_len


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: ``override_tflops`` when set, else looked up from the CUDA device
    name; None on CPU or an unknown GPU (MFU is then not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def device_description() -> str:
    """What one rank trains on, for the model card: the CUDA device name, else ``CPU (<machine>, <n> cores)``."""
    import os
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def peak_memory_gib() -> float:
    """Peak memory of this process in GiB: CUDA allocator peak on GPU, else peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
