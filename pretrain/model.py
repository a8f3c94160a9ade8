"""Models built from transformers configs (no weights are downloaded).

Presets are dictionaries of ``LlamaConfig`` / ``GPT2Config`` fields. Sizes follow the anchors:
``llama-125m`` / ``350m`` / ``1b`` match GPT-3's small / medium / XL shapes (Brown et al., 2020,
table 2.1) in Llama form; ``llama-7b`` is Llama-2-7B (Touvron et al., 2023).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pretrain.errors import ConfigError

EMBEDDING_MULTIPLE = 64
"""The embedding is padded to a multiple of 64 rows: tensor-core friendly (Karpathy, nanoGPT)."""

PRESETS: dict[str, dict[str, Any]] = {
    "llama-test": dict(model_type="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
    "llama-tiny": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024),
    "llama-125m": dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048),
    "llama-350m": dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048),
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "gpt2-small": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    # Qwen3 (Qwen team 2025): QK-norm, GQA, per-layer attention types (layer_types); the test size for CI
    "qwen3-test": dict(model_type="qwen3", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    # masked LMs: BERT-base (Devlin et al. 2019), RoBERTa-base (Liu et al. 2019), ModernBERT-base (Warner et al. 2024)
    "bert-test": dict(model_type="bert", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=512),
    "bert-base": dict(model_type="bert", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=512),
    "roberta-base": dict(model_type="roberta", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=514),
    "modernbert-base": dict(model_type="modernbert", hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                            num_attention_heads=12, max_position_embeddings=8192),
}
MASKED_LM_TYPES = ("bert", "roberta", "modernbert")

def attention_problem(attention: str, objective: str, document_masking: bool, device: str) -> str | None:
    """Why ``attention`` (one of :data:`pretrain.config.Attention`, transformers' ``attn_implementation`` values)
    cannot train here (one line), or None.

    Each kernel keeps document masking of causal LMs: the positions restart at every document, and transformers
    (``masking_utils.find_packed_sequence_indices``) turns that into a block-diagonal causal mask for sdpa / eager
    and a document block mask for flex_attention, while flash_attention_2 runs varlen attention over the documents
    found from the same ``position_ids``.

    ``device``: ``cuda`` or ``cpu``, where the ranks train. flash_attention_2 needs the flash-attn package and
    CUDA, and cannot take the ``(B, 1, T, T)`` document mask of masked LMs; flex_attention has no CPU backward
    in torch 2.13 ("FlexAttention does not support backward on CPU").
    """
    import importlib.util

    if attention == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return "model.attention=flash_attention_2 needs the flash-attn package (pip install flash-attn)"
        if device != "cuda":
            return f"model.attention=flash_attention_2 needs CUDA (training on {device}); use sdpa"
        if objective == "mlm" and document_masking:
            return ("model.attention=flash_attention_2 cannot take the masked LM's (B, 1, T, T) document mask; "
                    "use sdpa, or data.document_masking=false")
    if attention == "flex_attention" and device != "cuda":
        return f"model.attention=flex_attention has no backward on {device} in torch; use sdpa or eager"
    return None


def objective_of(config) -> str:
    """``mlm`` for masked-LM architectures, else ``clm``."""
    return "mlm" if config.model_type in MASKED_LM_TYPES else "clm"


def auto_model_class(config):
    """``AutoModelForMaskedLM`` or ``AutoModelForCausalLM`` for ``config``."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if objective_of(config) == "mlm" else AutoModelForCausalLM


def padded_vocab_size(vocab_size: int, multiple: int = EMBEDDING_MULTIPLE) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (tokens)."""
    return -(-vocab_size // multiple) * multiple


def build_model_config(preset: str, vocab_size: int, seq_len: int, special_ids: Mapping[str, int | None],
                       overrides: dict[str, Any] | None = None):
    """A transformers ``PretrainedConfig`` for ``preset`` with ``vocab_size`` embedding rows.

    ``max_position_embeddings`` is raised to ``seq_len`` when the preset's is smaller (it is the
    user's override that the consistency check then holds to). ``overrides`` win over everything.

    Raises:
        ConfigError: unknown preset, or an override that is not a field of the config class.
    """
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise ConfigError(f"model.preset={preset!r} (allowed: {', '.join(PRESETS)})")
    fields = dict(PRESETS[preset])
    model_type = fields.pop("model_type")
    pos_key = "n_positions" if model_type == "gpt2" else "max_position_embeddings"
    fields[pos_key] = max(fields[pos_key], seq_len)
    if model_type == "roberta":  # RoBERTa offsets positions by padding_idx + 1
        fields["max_position_embeddings"] = max(fields["max_position_embeddings"], seq_len + 2)
    fields.update(vocab_size=vocab_size, tie_word_embeddings=model_type in MASKED_LM_TYPES,
                  **{k: v for k, v in special_ids.items() if v is not None})
    defaults = AutoConfig.for_model(model_type).to_dict()  # the class's own vocabulary: its ids are valid there
    for key, value in {**defaults, **fields}.items():  # a default id from another vocabulary: None, before the class
        if key.endswith("_token_id") and special_ids.get(key) is None and isinstance(value, int) \
                and not 0 <= value < vocab_size:  # validates it (ModernBERT's cls 50281 warned on an 8k vocabulary)
            fields[key] = None
    return _apply_overrides(AutoConfig.for_model(model_type, **fields), overrides)


def _apply_overrides(config, overrides: dict[str, Any] | None):
    """``config`` rebuilt by its class with ``overrides`` applied, so fields derived from others are derived again.

    Per-layer lists (``layer_types`` of ModernBERT, Qwen3, Gemma ...) are recomputed by the config class
    when ``num_hidden_layers`` changes and the override does not give them: a list whose length was the
    old depth is dropped before the rebuild. The class's own validation then runs on the result.

    Raises:
        ConfigError: an override is not a field of the config class, or the class rejects the
            combination (one line, with the class's reason).
    """
    if not overrides:
        return config
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise ConfigError("; ".join(f"model.overrides.{k}: not a field of {type(config).__name__}" for k in unknown))
    fields = config.to_dict()
    depth_key = "num_hidden_layers" if "num_hidden_layers" in fields else None
    if depth_key and depth_key in overrides and overrides[depth_key] != fields[depth_key]:
        for key, value in list(fields.items()):
            if key not in overrides and isinstance(value, list) and len(value) == fields[depth_key]:
                del fields[key]  # a per-layer list of the old depth: let the class derive it for the new one
    fields.update(overrides)
    from huggingface_hub.errors import StrictDataclassError  # transformers validates configs through these

    try:
        return type(config)(**{k: v for k, v in fields.items() if k != "model_type"})
    except (ValueError, TypeError, StrictDataclassError) as exc:
        reason = " ".join(str(exc).split("\n")[-1].split())
        given = ", ".join(f"{k}={v}" for k, v in overrides.items())
        raise ConfigError(f"model.overrides ({given}) are invalid for {type(config).__name__}: {reason}") from None


def load_model_config(path: str, overrides: dict[str, Any] | None = None):
    """The config of a local Hugging Face model folder, for continued pretraining.

    Raises:
        ConfigError: not a folder with a ``config.json``, or a bad override.
    """
    from pathlib import Path

    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.init_from={path}: no config.json there (a local Hugging Face model folder is needed)")
    return _apply_overrides(AutoConfig.from_pretrained(path, local_files_only=True), overrides)


def build_model(config, seed: int, init_from: str = "", ds_config: dict | None = None, attention: str = "sdpa"):
    """A causal or masked LM for ``config`` (float32 weights), randomly initialised by :func:`seeded_init`
    (the same weights for a seed whatever the world size or ZeRO stage), or loaded from the local folder
    ``init_from`` for continued pretraining.

    ``ds_config``: the generated DeepSpeed config. At ZeRO stage 3 the parameters are partitioned as
    they are created, so no rank ever holds the whole model: transformers' ``HfDeepSpeedConfig`` (its
    supported door to DeepSpeed) makes ``from_config`` / ``from_pretrained`` build under
    ``deepspeed.zero.Init`` and load checkpoints shard by shard into the partitions. The config object is
    kept alive on the model (transformers holds only a weak reference to it). Needs torch.distributed
    initialised at stage 3.

    ``attention``: transformers' ``attn_implementation`` (one of :data:`pretrain.config.Attention`; checked
    beforehand by :func:`attention_problem`).
    """
    import torch

    torch.manual_seed(seed)
    cls = auto_model_class(config)
    if ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (kept alive while building)
    if init_from:
        model = cls.from_pretrained(init_from, config=config, dtype=torch.float32, local_files_only=True,
                                    attn_implementation=attention)
    else:
        model = cls.from_config(config, attn_implementation=attention)
        seeded_init(model, seed)
    return model


def seeded_init(model, seed: int) -> None:
    """Draw every module's weights with the model's own rule (``PreTrainedModel._init_weights``, e.g. normal(0,
    ``initializer_range``) for linear and embedding weights, ones for norms), seeding torch per module with
    ``seed + its index in model.modules()``, children before parents as transformers does.

    The weights then depend on ``seed`` alone: transformers' ZeRO-3 path draws them in another stream
    (no torch default init first, rank 0 only), so without this the first step at stage 3 differed from
    stages 0-2. At stage 3 each module's partitions are gathered, rank 0 draws the full tensors and
    DeepSpeed scatters them back (``deepspeed.zero.GatheredParameters(modifier_rank=0)``), one module at a time.
    """
    import contextlib

    import torch

    modules = list(model.modules())
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    drawing = not partitioned or torch.distributed.get_rank() == 0
    with torch.no_grad():
        for index in reversed(range(len(modules))):  # every module after its descendants
            module = modules[index]
            params = [p for m in (module, *module.children()) for p in m.parameters(recurse=False)]
            if not params:
                continue
            if partitioned:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
            else:
                gather = contextlib.nullcontext()
            with gather:
                if drawing:
                    torch.manual_seed(seed + index)
                    model._init_weights(module)


def meta_model(config):
    """``config``'s model built on the meta device: shapes only, no memory, no initialisation time."""
    import torch

    with torch.device("meta"):
        return auto_model_class(config).from_config(config)


def count_parameters(config) -> int:
    """Number of parameters (elements) of ``config``'s model, embeddings included, tied weights once;
    counted on the meta device (nothing is allocated)."""
    return sum(p.numel() for p in meta_model(config).parameters())


def hidden_size(config) -> int:
    """Model width (``hidden_size``, GPT-2's ``n_embd``)."""
    return getattr(config, "hidden_size", None) or config.n_embd


def num_layers(config) -> int:
    """Transformer layers (``num_hidden_layers``, GPT-2's ``n_layer``)."""
    return getattr(config, "num_hidden_layers", None) or config.n_layer
