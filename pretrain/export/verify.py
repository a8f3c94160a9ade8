"""Verify an exported Hugging Face folder the way a user will load it.

Run in a fresh process (``lmforge verify``, which the export starts), so nothing of the exporting
process (DeepSpeed, cached modules, tensors in memory) can stand in for a broken folder:

1. ``AutoModelFor{CausalLM,MaskedLM}.from_pretrained`` with ``output_loading_info``: no missing,
   unexpected or mismatched weights; the embedding has ``config.vocab_size`` rows and the tokenizer fits.
2. Logits on the probe batch the training engine stored with the checkpoint (``probe.safetensors``),
   compared at the training dtype. The model is loaded with ``from_pretrained(dtype=...)``, not cast
   with ``.to(dtype)`` afterwards, which would also cast the float32 rotary buffers DeepSpeed keeps and
   move logits by ~0.06 in bf16. Where the reload can compute exactly what the engine computed (see
   :func:`inexact_reason`), the logits must be bit-identical: same weights (the exported dtype is float32
   or the training dtype, and casting float32 master weights rounds as DeepSpeed's own copy does), same
   inputs, same dtype, and the same CPU kernels, which needs the same intra-op thread count: on CPU a
   bf16 matmul's sums are split over threads, so 1 vs 2 threads moves bf16 logits by one ulp (0.0625 at
   |logit| ~ 10; a 2-rank run on 2 cores trains with 1 thread per rank), and the same linear layers:
   DeepSpeed ZeRO-3 replaces ``torch.nn.functional.linear`` process-wide with its own (a matmul, then
   ``+= bias``: two roundings where torch's fused addmm makes one; up to 0.006 on a bf16 BERT), so its
   logits are recomputed with that same function (the probe records which). Elsewhere (probe computed on a
   GPU, another CPU or torch, an export dtype that rounds the weights differently) the per-dtype
   tolerance :data:`LOGIT_TOLERANCE` applies.
3. ``pipeline("text-generation")`` or ``pipeline("fill-mask")`` on the loaded model and tokenizer.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

from pretrain.errors import ExportError

PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""lmforge precision name -> torch dtype name."""
LOGIT_TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (1e-3, 1e-3), "bf16": (1.6e-2, 1e-2)}
"""(rtol, atol) per dtype for ``|got - expected| <= atol + rtol * |expected|``, used only where the logits
cannot be bit-identical (:func:`inexact_reason`). bf16 / fp16 rtol are torch.testing's defaults for those
dtypes (one bf16 ulp is 2**-8 relative); listed loosest last."""
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
"""Unit roundoff of round-to-nearest per dtype (half an ulp relative: 8 significand bits for bfloat16, 11 for
float16, 24 for float32)."""
ROUNDED_WEIGHTS_FACTOR = 0.25
"""``c`` of :func:`rounded_weights_atol`: measured on fp32-trained llama-125m, llama-350m and llama-1b checkpoints
exported to bf16 (``bench/bench_export.py --full``), the largest logit error over 64 x 512 probe logits was
0.065-0.071 x ``u * sqrt(layers * hidden) * rms(logits)``; 0.25 leaves a margin of 3.5x."""
EXACT_TOLERANCE = (0.0, 0.0)
"""(rtol, atol) where the reload computes exactly what the engine computed: bit-identical logits."""
LINEAR_MODULES = ("deepspeed.",)
"""Packages whose replacement of ``torch.nn.functional.linear`` the verification imports to recompute the probe."""
EXACT_KEYS = ("device", "intra_op_threads", "cpu_capability", "torch", "linear")
"""Probe metadata that decides whether a reload can reproduce the engine's logits bit for bit."""


def dtype_precision(dtype_name: str) -> str:
    """``float32`` / ``bfloat16`` / ``float16`` -> ``fp32`` / ``bf16`` / ``fp16``."""
    names = {v: k for k, v in PRECISION_DTYPES.items()}
    return names[str(dtype_name).removeprefix("torch.")]


def tolerance(train_precision: str, export_precision: str) -> tuple[float, float]:
    """``(rtol, atol)``: the looser of the training dtype's and the exported weights' dtype's."""
    order = list(LOGIT_TOLERANCE)
    return LOGIT_TOLERANCE[max(train_precision, export_precision, key=order.index)]


def rounded_weights_atol(train_precision: str, export_precision: str, num_layers: int, hidden_size: int,
                         logits_rms: float) -> float:
    """Absolute logit tolerance for weights exported in a dtype that rounds them differently from the weights
    that computed the probe (exported in ``export_precision``, neither fp32 nor the training precision); 0.0
    otherwise.

    ``c * u * sqrt(num_layers * hidden_size) * logits_rms``, with ``u`` the export dtype's unit roundoff
    (:data:`UNIT_ROUNDOFF`) and ``c`` :data:`ROUNDED_WEIGHTS_FACTOR`: independent rounding errors grow with the
    square root of the number of terms they are summed over (Higham, *Accuracy and Stability of Numerical
    Algorithms*, probabilistic bounds), here the inputs of each matmul times the layers of the residual stream,
    and scale with the logits (``logits_rms``: root mean square of the probe logits). An export with wrong
    weights or a wrong config misses by about ``logits_rms`` itself; an fp32-trained llama-1b exported to bf16
    misses by 0.057 x ``logits_rms``, beyond the dtype tolerance of :data:`LOGIT_TOLERANCE` alone.
    """
    if export_precision in ("fp32", train_precision):
        return 0.0
    return ROUNDED_WEIGHTS_FACTOR * UNIT_ROUNDOFF[export_precision] * (num_layers * hidden_size) ** 0.5 * logits_rms


def probe_metadata(precision: str, device) -> dict[str, str]:
    """The metadata a trainer stores with its probe logits (``probe.safetensors``; strings only): the
    training ``precision`` (fp32 / bf16 / fp16) and what the logits' exact values depend on besides
    weights and inputs: the ``device`` type they were computed on, torch's intra-op thread count, the CPU
    kernels' instruction set (``torch.backends.cpu.get_cpu_capability()``), the torch version, and which
    function ``torch.nn.functional.linear`` was (``torch``, or the ``module.name`` of a replacement such as
    DeepSpeed ZeRO-3's ``deepspeed.runtime.zero.linear.zero3_linear_wrap``)."""
    import torch
    import torch.nn.functional as F

    linear = "torch" if F.linear is torch._C._nn.linear else f"{F.linear.__module__}.{F.linear.__qualname__}"
    return {"precision": precision, "device": torch.device(device).type, "intra_op_threads": str(torch.get_num_threads()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "linear": linear}


def inexact_reason(meta: dict, export_precision: str) -> str | None:
    """Why a CPU reload of the export cannot reproduce the probe logits bit for bit; None when it can.

    It can when the probe was computed on a CPU with this process's torch version and instruction set
    (the reload then uses the probe's thread count), and the exported weights, loaded in the training
    dtype, equal the engine's: exported in float32 (cast on load with the same rounding as DeepSpeed's
    master -> low-precision copy) or in the training dtype itself.
    """
    import torch

    here = {"device": "cpu", "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    missing = [k for k in EXACT_KEYS if k not in meta]
    if missing:
        return f"the probe does not record {', '.join(missing)} (saved by an older lmforge)"
    for key, value in here.items():
        if meta[key] != value:
            return f"probe computed with {key} {meta[key]}, this reload runs with {value}"
    if meta["linear"] != "torch" and not meta["linear"].startswith(LINEAR_MODULES):
        return f"trained with torch.nn.functional.linear replaced by {meta['linear']}"
    if export_precision not in ("fp32", meta["precision"]):
        return f"weights exported in {export_precision}, trained in {meta['precision']}: rounded differently"
    return None


@contextmanager
def engine_linear(name: str):
    """``torch.nn.functional.linear`` set to the function named ``name`` (``module.qualname``, as
    :func:`probe_metadata` records it; ``torch`` = unchanged) inside the block, restored after."""
    import importlib

    import torch.nn.functional as F

    if name == "torch":
        yield
        return
    module, _, attr = name.rpartition(".")
    saved, F.linear = F.linear, getattr(importlib.import_module(module), attr)
    try:
        yield
    finally:
        F.linear = saved


def read_probe(path: str | Path) -> tuple[dict, object, dict]:
    """``(model inputs, expected logits (B, T, V) float32, metadata)`` from ``probe.safetensors``.

    Every tensor but ``logits`` is a model input (``input_ids`` (B, T) int64, and any mask the trainer stored).
    The metadata (:func:`probe_metadata`) holds at least ``precision`` (fp32 when the file names none).

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
        meta = {"precision": "fp32", **(f.metadata() or {})}
    if meta["precision"] not in PRECISION_DTYPES:
        raise ExportError(f"{path}: probe precision {meta['precision']!r} (allowed: {', '.join(PRECISION_DTYPES)})")
    logits = tensors.pop("logits")
    return tensors, logits, meta


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
                          f"atol {atol:.3g} + rtol {rtol} x |logit| ({what})")
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
    ``tolerance``, ``exact`` (bit-identical logits required, tolerance 0), ``inexact_reason`` (why not,
    else None), ``pipeline``, ``prompt`` and ``continuation`` or ``fill_mask``. Where the logits can be
    exact, torch's intra-op threads are set to the probe's for the comparison and the pipeline.

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
    inputs, expected, meta = read_probe(probe) if probe is not None else ({}, None, {"precision": export_precision})
    precision = meta["precision"]
    reason = inexact_reason(meta, export_precision) if expected is not None else "no probe"
    if reason is None:
        torch.set_num_threads(int(meta["intra_op_threads"]))
    dtype = getattr(torch, PRECISION_DTYPES[precision])
    model, info = auto_model_class(config).from_pretrained(hf_dir, dtype=dtype, output_loading_info=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    _check_loaded(hf_dir, model, info, tok)
    result = {"precision": precision, "export_dtype": export_precision, "probe": str(probe) if probe else None,
              "max_abs_logit_diff": None, "mean_abs_logit_diff": None, "tolerance": None, "exact": reason is None,
              "inexact_reason": reason}
    if expected is not None:
        with torch.no_grad(), engine_linear(meta["linear"]) if reason is None else nullcontext():
            got = model(**inputs).logits
        rtol, atol = EXACT_TOLERANCE if reason is None else tolerance(precision, export_precision)
        if reason is not None:
            logits_rms = float(torch.as_tensor(expected).float().pow(2).mean().sqrt())
            atol = max(atol, rounded_weights_atol(precision, export_precision, config.num_hidden_layers,
                                                  config.hidden_size, logits_rms))
        what = f"training precision {precision}, exported {export_precision}, compared in {precision}; " + (
            f"bit-identical expected with {torch.get_num_threads()} thread(s) as at save time" if reason is None
            else f"not bit-identical: {reason}")
        result.update(compare_logits(got, expected, rtol, atol, hf_dir, what))
    if prompt is None:
        ids = inputs["input_ids"][0, :8].tolist() if inputs else []
        prompt = str(tok.decode(ids, skip_special_tokens=True)) or "The"
    result["prompt"] = prompt
    result.update(_run_pipeline(model, tok, objective_of(config), prompt, max_new_tokens, seed))
    return result
