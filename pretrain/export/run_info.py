"""What the export knows about the run behind a checkpoint, read once and checked before any heavy work.

A checkpoint folder (``RUN/checkpoints/step_XXXXXXXX``, see :mod:`pretrain.checkpoint`) carries its
training config, step, tokens and fingerprints in ``lmforge_state.json``; the run folder around it
has the files the trainer recorded about its model (``model/config.json`` naming the model class and
``model/generation_config.json``, :mod:`pretrain.model_files`), ``metrics.jsonl`` and, once finished,
``summary.json``; the config names the tokenizer and the prepared data (``manifest.json``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.tokenizer.folder import TOKENIZER_FILE, fingerprint
from pretrain import checkpoint
from pretrain.errors import ExportError
from pretrain.integrity import VerifyMode
from pretrain.layout import CHECKPOINT_DIR, MODEL_CONFIG_DIR, SUMMARY_FILE
from pretrain.metrics import METRICS_FILE
from pretrain.model import MASKED_LM_TYPES
from pretrain.model_files import CONFIG_FILE, GENERATION_CONFIG_FILE
from pretrain.sources import describe_data

log = logging.getLogger(__name__)

TOKENIZER_METADATA_FILE = "lmforge_tokenizer.json"


@dataclass
class RunInfo:
    tag_dir: Path
    """The checkpoint folder."""
    run_dir: Path
    state: dict
    """``lmforge_state.json``: step, consumed_samples, tokens, world_size, fingerprints, config_yaml, ..."""
    config: dict
    """The training config of this checkpoint (parsed ``config_yaml``)."""
    model_config: dict
    """transformers ``config.json`` of the run's model, ``architectures`` naming its class."""
    manifest: dict
    """The prepared data's ``manifest.json``."""
    tokenizer_dir: Path
    tokenizer: dict
    """``family``, ``vocab_size`` (tokens, added included), ``fingerprint`` (sha256 of tokenizer.json)."""
    train_records: list[dict]
    """metrics.jsonl training records up to the checkpoint's step, one per step (the last written), by step."""
    val_records: list[dict]
    """metrics.jsonl validation records (val_loss, val_ppl) up to the checkpoint's step, by step."""
    summary: dict | None
    """``summary.json`` when it describes this checkpoint (the run's final one), else None."""
    probe: Path | None
    """``probe.safetensors`` of the checkpoint, None when it has none."""

    @property
    def model_dir(self) -> Path:
        """``RUN/model``: config.json and generation_config.json recorded at train time."""
        return self.run_dir / MODEL_CONFIG_DIR

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def objective(self) -> str:
        """``mlm`` or ``clm``, from the model type."""
        return "mlm" if self.model_config.get("model_type") in MASKED_LM_TYPES else "clm"


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path``: a checkpoint, a run folder or its ``checkpoints`` folder
    (the newest complete checkpoint of the last two), after checking its files (:func:`verify_files`).

    Raises:
        ExportError: nothing there, no complete checkpoint (no ``lmforge_state.json``), or a bad file.
    """
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: checkpoint folder not found")
    if (path / checkpoint.STATE_FILE).is_file():
        return verify_files(path)
    for root in (path / CHECKPOINT_DIR, path):
        newest = checkpoint.latest_complete(root)
        if newest is not None:
            return verify_files(newest)
    raise ExportError(f"{path}: not a complete checkpoint (no {checkpoint.STATE_FILE}) and holds none; "
                      "a save that did not finish cannot be exported")


def verify_files(tag_dir: Path, mode: VerifyMode = "checksum") -> Path:
    """``tag_dir`` after checking every file against the sizes and XXH3-128 digests recorded at save
    (:func:`pretrain.integrity.verify`; a checkpoint without a record passes with a log line).

    Raises:
        ExportError: a file is missing, has another size or another digest (the message names it).
    """
    verdict = checkpoint.verify_saved(tag_dir, mode)
    if not verdict.usable:
        raise ExportError(f"{verdict.line()}; this checkpoint cannot be exported "
                          "(`lmforge checkpoint verify RUN_DIR` lists the checkpoints that verify)")
    if verdict.status == "unrecorded":
        log.info("%s: no recorded digests (saved before lmforge recorded them); exporting it unverified", tag_dir)
    return tag_dir


def tokenizer_summary(tokenizer_dir: Path) -> dict:
    """Family, vocabulary size and fingerprint of a tokenizer folder (``tokenizers`` only, no transformers)."""
    from tokenizers import Tokenizer

    meta_file = tokenizer_dir / TOKENIZER_METADATA_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    spec = json.loads((tokenizer_dir / TOKENIZER_FILE).read_text(encoding="utf-8"))
    model_type = spec.get("model", {}).get("type", "unknown")
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    family = meta.get("family") or (f"byte-level {model_type}" if '"ByteLevel"' in pre else model_type)
    size = Tokenizer.from_file(str(tokenizer_dir / TOKENIZER_FILE)).get_vocab_size(with_added_tokens=True)
    return {"family": family, "vocab_size": size, "fingerprint": fingerprint(tokenizer_dir)}


def _metric_records(run_dir: Path, upto_step: int) -> tuple[list[dict], list[dict]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        log.warning("%s: not found; the model card will have no loss curve and no evaluation", path)
        return [], []
    train, val = {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("step", upto_step + 1) > upto_step:
            continue  # logged after this checkpoint (or before a resume from an earlier one)
        if rec.get("loss") is not None:
            train[rec["step"]] = rec
        if rec.get("val_loss") is not None:
            val[rec["step"]] = rec
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def _recorded_model_config(model_dir: Path) -> dict:
    """``model_dir/config.json``, after checking the trainer recorded the model class and generation config.

    Raises:
        ExportError: config.json missing or without ``architectures``, or generation_config.json missing
            (a run from before lmforge recorded them: one line saying so).
    """
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path}: model config of the run not found (the checkpoint must stay in RUN/checkpoints/)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if not config.get("architectures") or not (model_dir / GENERATION_CONFIG_FILE).is_file():
        raise ExportError(f"{model_dir}: no model class ('architectures' in {CONFIG_FILE}) or {GENERATION_CONFIG_FILE}; "
                          "the run was trained before lmforge recorded them (pretrain.model_files.write_model_files "
                          "writes them for a model built from this config)")
    return config


def load_run_info(tag_dir: Path) -> RunInfo:
    """Read and cross-check everything about checkpoint ``tag_dir`` the export needs.

    Raises:
        ExportError: no model config, model class or generation config recorded, a tokenizer or prepared
            data that is missing or changed since training (fingerprints differ).
    """
    from omegaconf import OmegaConf

    state = checkpoint.read_state(tag_dir)
    config: dict[str, Any] = OmegaConf.to_container(OmegaConf.create(state["config_yaml"]))  # type: ignore[assignment]
    run_dir = tag_dir.parent.parent
    model_config = _recorded_model_config(run_dir / MODEL_CONFIG_DIR)
    fingerprints = state.get("fingerprints", {})
    # the run's own copy (pretrain.checkpointer.own_run_files), relative to the run folder wherever it now is
    tok_dir = run_dir / state["tokenizer_dir"] if state.get("tokenizer_dir") else Path(config["data"]["tokenizer"])
    if not (tok_dir / TOKENIZER_FILE).is_file():
        where = "tokenizer_dir" if state.get("tokenizer_dir") else "data.tokenizer"
        raise ExportError(f"{tok_dir}: tokenizer of the run ({where} in {tag_dir / checkpoint.STATE_FILE}) not found")
    tok = tokenizer_summary(tok_dir)
    if fingerprints.get("tokenizer") not in (None, tok["fingerprint"]):
        raise ExportError(f"{tok_dir / TOKENIZER_FILE}: fingerprint {tok['fingerprint'][:12]} differs from the one the "
                          f"checkpoint was trained with ({fingerprints['tokenizer'][:12]}); the tokenizer changed")
    manifest, data_fingerprint = describe_data(config["data"])
    if fingerprints.get("data") not in (None, data_fingerprint):
        raise ExportError(f"{config['data'].get('path') or 'the blend / raw inputs'}: the training data changed since the "
                          "checkpoint was trained (fingerprint differs); the model card would describe other data")
    if manifest is None:  # a raw corpus streamed during training: no prep counts
        manifest = {"seq_len": config["seq_len"], "counts": None, "sources": list(config["data"]["raw_inputs"]),
                    "objective": "clm"}
    train, val = _metric_records(run_dir, int(state["step"]))
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if summary is not None and summary.get("checkpoint_tag") != tag_dir.name:
        summary = None
    probe = tag_dir / checkpoint.PROBE_FILE
    return RunInfo(tag_dir=tag_dir, run_dir=run_dir, state=state, config=config,
                   model_config=model_config, manifest=manifest, tokenizer_dir=tok_dir,
                   tokenizer=tok, train_records=train, val_records=val, summary=summary,
                   probe=probe if probe.is_file() else None)


def training_wall_s(train_records: list[dict]) -> float | None:
    """Training wall time in seconds: the sum over logged intervals of tokens / (tokens/s); None without records.

    Each record's ``tokens_per_s`` covers the wall time since the previous record (evaluations and
    saves included), so the sum spans resumes, which ``summary.json``'s ``elapsed_s`` (one session) does not.
    """
    total, prev_tokens = 0.0, 0
    for rec in train_records:
        rate, tokens = rec.get("tokens_per_s"), rec.get("tokens")
        if rate and tokens is not None and tokens > prev_tokens:
            total += (tokens - prev_tokens) / rate
        prev_tokens = tokens if tokens is not None else prev_tokens
    return total if train_records else None
