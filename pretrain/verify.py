"""Verify an exported Hugging Face folder the way a user will load it.

Run in a fresh process (``lmforge verify``, which the export starts), so nothing of the exporting
process (DeepSpeed, cached modules, tensors in memory) can stand in for a broken folder:

1. ``AutoModelFor{CausalLM,MaskedLM}.from_pretrained`` with ``output_loading_info``: no missing,
   unexpected or mismatched weights; the embedding has ``config.vocab_size`` rows and the tokenizer fits.
2. Logits on the probe batch the training engine stored with the checkpoint (``probe.safetensors``),
   compared at the training dtype. The model is loaded with ``from_pretrained(dtype=...)``, not cast
   with ``.to(dtype)`` afterwards, which would also cast the float32 rotary buffers DeepSpeed keeps and
   move logits by ~0.06 in bf16.
3. ``pipeline("text-generation")`` or ``pipeline("fill-mask")`` on the loaded model and tokenizer.
"""
from __future__ import annotations

from pathlib import Path

from pretrain.errors import ExportError

PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""lmforge precision name -> torch dtype name."""
LOGIT_TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (1e-3, 1e-3), "bf16": (1.6e-2, 1e-2)}
"""(rtol, atol) per dtype for ``|got - expected| <= atol + rtol * |expected|``. bf16 / fp16 rtol are
torch.testing's defaults for those dtypes (one bf16 ulp is 2**-8 relative); listed loosest last."""


def dtype_precision(dtype_name: str) -> str:
    """``float32`` / ``bfloat16`` / ``float16`` -> ``fp32`` / ``bf16`` / ``fp16``."""
    names = {v: k for k, v in PRECISION_DTYPES.items()}
    return names[str(dtype_name).removeprefix("torch.")]


def tolerance(train_precision: str, export_precision: str) -> tuple[float, float]:
    """``(rtol, atol)``: the looser of the training dtype's and the exported weights' dtype's."""
    order = list(LOGIT_TOLERANCE)
    return LOGIT_TOLERANCE[max(train_precision, export_precision, key=order.index)]


def read_probe(path: str | Path) -> tuple[dict, object, str]:
    """``(model inputs, expected logits (B, T, V) float32, training precision)`` from ``probe.safetensors``.

    Every tensor but ``logits`` is a model input (``input_ids`` (B, T) int64, and any mask the trainer stored).

    Raises:
        ExportError: the file is missing or holds no ``input_ids`` / ``logits``.
    """
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ExportError(f"{path}: probe file not found")
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if not {"input_ids", "logits"} <= names:
            raise ExportError(f"{path}: probe holds {sorted(names)}, needs input_ids and logits")
        tensors = {k: f.get_tensor(k) for k in names}
        precision = (f.metadata() or {}).get("precision", "fp32")
    if precision not in PRECISION_DTYPES:
        raise ExportError(f"{path}: probe precision {precision!r} (allowed: {', '.join(PRECISION_DTYPES)})")
    logits = tensors.pop("logits")
    return tensors, logits, precision


def compare_logits(got, expected, rtol: float, atol: float, where: str, what: str) -> dict:
    """Max / mean absolute difference of two ``(B, T, V)`` logit tensors.

    Raises:
        ExportError: some value beyond ``atol + rtol * |expected|``; says by how much.
    """
    if tuple(got.shape) != tuple(expected.shape):
        raise ExportError(f"{where}: logits of shape {tuple(got.shape)}, the trained model's {tuple(expected.shape)}")
    err = (got.float() - expected.float()).abs()
    bad = err > atol + rtol * expected.float().abs()
    stats = {"max_abs_logit_diff": err.max().item(), "mean_abs_logit_diff": err.mean().item(),
             "tolerance": {"rtol": rtol, "atol": atol}}
    if bool(bad.any()):
        raise ExportError(f"{where}: logits differ from the trained model's by up to {stats['max_abs_logit_diff']:.4g} "
                          f"(mean {stats['mean_abs_logit_diff']:.3g}); {int(bad.sum())} of {bad.numel()} values beyond "
                          f"atol {atol} + rtol {rtol} x |logit| ({what})")
    return stats


def _check_loaded(hf_dir: str, model, info: dict, tok) -> None:
    problems = [f"{k.replace('_', ' ')} {list(v)[:3]}" for k, v in info.items()
                if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v]
    config, rows = model.config, model.get_input_embeddings().weight.shape[0]
    if rows != config.vocab_size:
        problems.append(f"embedding has {rows} rows but config.json vocab_size={config.vocab_size}")
    if len(tok) > rows:
        problems.append(f"tokenizer has {len(tok)} tokens, the embedding {rows} rows")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not 0 <= value < rows:
            problems.append(f"config.json {name}={value} outside the vocabulary [0, {rows})")
    if problems:
        raise ExportError(f"{hf_dir}: " + "; ".join(problems))


def _run_pipeline(model, tok, objective: str, prompt: str, max_new_tokens: int, seed: int) -> dict:
    import torch
    from transformers import pipeline

    torch.manual_seed(seed)
    if objective == "mlm":
        if tok.mask_token is None:
            raise ExportError(f"{tok.name_or_path}: tokenizer has no mask token; pipeline('fill-mask') needs one")
        fill = pipeline("fill-mask", model=model, tokenizer=tok)(f"{prompt}{tok.mask_token}", top_k=3)
        return {"pipeline": "fill-mask", "fill_mask": [{"token_str": r["token_str"], "score": r["score"]} for r in fill]}
    out = pipeline("text-generation", model=model, tokenizer=tok)(
        prompt, max_new_tokens=max_new_tokens, do_sample=True, top_k=20, temperature=0.7, return_full_text=False,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return {"pipeline": "text-generation", "continuation": out[0]["generated_text"]}


def verify_export(hf_dir: str | Path, probe: str | Path | None = None, prompt: str | None = None,
                  max_new_tokens: int = 8, seed: int = 0) -> dict:
    """Load ``hf_dir`` with transformers, compare logits with ``probe``, run the task's pipeline.

    ``prompt`` defaults to the first tokens of the probe batch, decoded. Returns a JSON-able dict:
    ``precision`` (training), ``export_dtype``, ``max_abs_logit_diff``, ``mean_abs_logit_diff``,
    ``tolerance``, ``pipeline``, ``prompt`` and ``continuation`` or ``fill_mask``.

    Raises:
        ExportError: missing / unexpected weights, a tokenizer or special ids that do not fit the
            embedding, logits beyond the tolerance (with the size of the difference), or a
            masked-LM tokenizer without a mask token.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from pretrain.model import auto_model_class, objective_of

    hf_dir = str(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    export_precision = dtype_precision(getattr(config, "dtype", None) or "float32")
    inputs, expected, precision = read_probe(probe) if probe is not None else ({}, None, export_precision)
    dtype = getattr(torch, PRECISION_DTYPES[precision])
    model, info = auto_model_class(config).from_pretrained(hf_dir, dtype=dtype, output_loading_info=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    _check_loaded(hf_dir, model, info, tok)
    result = {"precision": precision, "export_dtype": export_precision, "probe": str(probe) if probe else None,
              "max_abs_logit_diff": None, "mean_abs_logit_diff": None, "tolerance": None}
    if expected is not None:
        with torch.no_grad():
            got = model(**inputs).logits
        rtol, atol = tolerance(precision, export_precision)
        result.update(compare_logits(got, expected, rtol, atol, hf_dir,
                                     f"training precision {precision}, exported {export_precision}, compared in {precision}"))
    if prompt is None:
        ids = inputs["input_ids"][0, :8].tolist() if inputs else []
        prompt = tok.decode(ids, skip_special_tokens=True) or "The"
    result["prompt"] = prompt
    result.update(_run_pipeline(model, tok, objective_of(config), prompt, max_new_tokens, seed))
    return result
