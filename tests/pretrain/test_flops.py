import torch

from pretrain.flops import PEAK_BF16_TFLOPS, flops_per_token, peak_flops_per_device, peak_memory_gib
from pretrain.model import build_model, build_model_config, count_parameters


def test_flops_per_token_is_6n_plus_attention_term():
    config = build_model_config("llama-test", 512, 64, {})
    model = build_model(config, seed=0)
    # llama-test: hidden 64, 2 layers, 4 heads of 16, MLP 172, untied 512-row embedding and head
    per_layer = 4 * 64 * 64 + 3 * 64 * 172 + 2 * 64
    n_matmul = 2 * per_layer + 64 + 512 * 64  # layers, final norm, lm head (the input embedding is a lookup)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    assert flops_per_token(config, 64) == 6 * n_matmul + 12 * 2 * 4 * 16 * 64


def test_peak_flops_from_the_gpu_table_none_on_cpu_unless_given():
    """On CPU there is no peak (no MFU); on a GPU it is the table's bf16 peak for the device's name, or None
    for a GPU the table does not know. An override wins everywhere."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        known = [tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name]
        assert peak_flops_per_device() == (known[0] * 1e12 if known else None)
    else:
        assert peak_flops_per_device() is None
    assert peak_flops_per_device(100.0) == 100e12
    # the peak of this process: on CUDA the device's allocator peak, 0 until something was allocated there
    held = torch.empty(32 * 2**20, device="cuda" if torch.cuda.is_available() else "cpu")  # 128 MiB
    assert peak_memory_gib() > 0.1
    del held
