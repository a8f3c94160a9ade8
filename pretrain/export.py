"""Export a ZeRO checkpoint to a Hugging Face folder, and verify it in a fresh process.

The exported folder holds ``config.json``, ``model.safetensors`` (float32 master weights,
consolidated from the ZeRO partitions by DeepSpeed's ``zero_to_fp32``), ``generation_config.json``,
the tokenizer files and a ``README.md`` model card. It is written to ``OUT.tmp`` and renamed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from data_prep.errors import UserError
from data_prep.shards import read_manifest
from data_prep.tokenizer import fingerprint
from pretrain.config import load_config
from pretrain.trainer import CHECKPOINT_DIR, MODEL_CONFIG_DIR, SUMMARY_FILE

PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LOGIT_TOLERANCE = {"fp32": (1e-4, 1e-4), "bf16": (1.6e-2, 1e-2), "fp16": (1e-3, 1e-3)}
"""(rtol, atol) for the reloaded export's logits against the live engine's, at the training dtype:
``|got - expected| <= atol + rtol * |expected|``. bf16 / fp16 rtol are torch.testing's defaults
for those dtypes (one bf16 ulp is 2**-8 relative); the logits themselves are computed in that dtype.
"""


class ExportError(UserError):
    """The checkpoint cannot be exported, or the export does not reproduce the trained model."""


def latest_tag(checkpoint_dir: Path) -> str:
    """The tag DeepSpeed recorded in ``checkpoint_dir/latest``."""
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise ExportError(f"{checkpoint_dir}: no 'latest' file; no complete DeepSpeed checkpoint there")
    return latest.read_text().strip()


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> dict:
    """Full float32 state dict of checkpoint ``tag``: ZeRO partitions merged, or the module of a stage-0 run."""
    import torch

    tag_dir = checkpoint_dir / tag
    if not tag_dir.is_dir():
        raise ExportError(f"{tag_dir}: checkpoint tag not found")
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def model_card(cfg, summary: dict, manifest: dict, n_params: int) -> str:
    """A Hub model card (YAML front matter + Markdown) describing the model, data and training run."""
    c = manifest["counts"]
    ds = cfg.deepspeed
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [lmforge, causal-lm, pretrained-from-scratch]
---
# {Path(cfg.run_dir).name} ({cfg.model.preset})

A causal language model pretrained from scratch with lmforge (DeepSpeed ZeRO stage {ds.zero_stage}, {ds.precision}).

## Model
- architecture: {cfg.model.preset}, {n_params / 1e6:.2f}M parameters
- sequence length: {manifest['seq_len']} tokens
- tokenizer fingerprint (sha256 of tokenizer.json): `{manifest['tokenizer']['fingerprint']}`

## Training
- steps: {summary['steps']}, tokens: {summary['tokens']:,}, global batch: {summary['consumed_samples'] // max(summary['steps'], 1)} sequences
- data-parallel ranks: {summary['world_size']}, micro batch {ds.micro_batch_size}, gradient accumulation {ds.gradient_accumulation_steps}
- optimizer: AdamW, peak lr {cfg.optim.lr}, {cfg.optim.schedule} schedule, {cfg.optim.warmup_steps} warmup steps
- data: {c['documents']:,} documents, {c['tokens']:,} tokens, {c['sequences']:,} packed sequences

## Evaluation (held-out split)
| | loss | perplexity |
|---|---|---|
| start | {summary['val_loss_start']:.4f} | {summary['val_ppl_start']:.2f} |
| end | {summary['val_loss_end']:.4f} | {summary['val_ppl_end']:.2f} |

## Use
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("PATH")
model = AutoModelForCausalLM.from_pretrained("PATH")
```
"""


def export_hf(run_dir: str | Path, output: str | Path, tag: str | None = None) -> Path:
    """Export checkpoint ``tag`` (default: latest) of ``run_dir`` to a Hugging Face folder ``output``.

    Raises:
        ExportError: no checkpoint, a state dict that does not fit the model config, or a
            tokenizer that differs from the one the data was prepared with.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run_dir, output = Path(run_dir), Path(output)
    cfg = load_config(run_dir / "config.yaml")
    summary = json.loads((run_dir / SUMMARY_FILE).read_text()) if (run_dir / SUMMARY_FILE).is_file() else None
    if summary is None:
        raise ExportError(f"{run_dir}: no {SUMMARY_FILE}; the run did not finish")
    manifest = read_manifest(cfg.data.path)
    if fingerprint(cfg.data.tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise ExportError(f"{cfg.data.tokenizer}: tokenizer changed since the data was prepared (fingerprint mismatch)")
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    tag = tag or latest_tag(checkpoint_dir)
    config = AutoConfig.from_pretrained(str(run_dir / MODEL_CONFIG_DIR))
    model = AutoModelForCausalLM.from_config(config)
    state = consolidated_state_dict(checkpoint_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{checkpoint_dir / tag}: state dict does not fit {config.model_type}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(cfg.data.tokenizer).save_pretrained(str(tmp))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(str(tmp))
    n_params = sum(p.numel() for p in model.parameters())
    (tmp / "README.md").write_text(model_card(cfg, summary, manifest, n_params), encoding="utf-8")
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return output


def verify_export(hf_dir: str | Path, probe: str | Path | None = None, prompt: str = "def fibonacci(n):",
                  max_new_tokens: int = 40, seed: int = 0) -> dict:
    """Reload ``hf_dir`` with transformers, compare logits with the run's probe, and generate.

    Returns ``{"max_abs_logit_diff", "tolerance", "continuation"}``.

    Raises:
        ExportError: the tokenizer does not fit the embedding, or the logits differ from the
            probe by more than the tolerance of the training precision.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    precision, ids, expected = "fp32", None, None
    if probe is not None:
        from safetensors import safe_open

        with safe_open(str(probe), framework="pt") as f:
            precision = f.metadata().get("precision", "fp32")
            ids, expected = f.get_tensor("input_ids"), f.get_tensor("logits")
    # Load at the training dtype (not .to(dtype), which would also cast the fp32 rotary buffers that
    # DeepSpeed keeps in fp32): then the weights are bit-identical to the live engine's.
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=getattr(torch, PRECISION_DTYPES[precision]))
    if len(tok) > model.config.vocab_size:
        raise ExportError(f"{hf_dir}: tokenizer has {len(tok)} tokens, embedding {model.config.vocab_size} rows")
    result = {"max_abs_logit_diff": None, "tolerance": None, "precision": precision}
    if probe is not None:
        with torch.no_grad():
            got = model(input_ids=ids).logits.float()
        rtol, atol = LOGIT_TOLERANCE[precision]
        err = (got - expected).abs()
        excess = (err - rtol * expected.abs()).max().item()
        result.update(max_abs_logit_diff=err.max().item(), tolerance={"rtol": rtol, "atol": atol})
        if not excess <= atol:
            raise ExportError(f"{hf_dir}: logits differ from the trained model's by up to {err.max().item():.4g} "
                              f"(beyond rtol {rtol} + atol {atol} at {precision})")
    torch.manual_seed(seed)
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=20, temperature=0.7,
                             pad_token_id=tok.pad_token_id)
    result["continuation"] = tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    result["prompt"] = prompt
    return result
