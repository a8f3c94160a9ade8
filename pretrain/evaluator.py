"""Validation: the held-out loss and perplexity, and when to measure them (start, every N steps, end)."""
from __future__ import annotations

import math

import numpy as np

from data_prep.encode import VAL
from pretrain.config import TrainConfig
from pretrain.distributed import all_reduce_sum, log_rank0
from pretrain.errors import ConsistencyError
from pretrain.inputs import IGNORE_INDEX
from pretrain.metrics import MetricsWriter
from pretrain.run import Run
from pretrain.step import to_device

VAL_DOCUMENTS_WANTED = 5
"""Documents a suggested ``--val-fraction`` holds out on average: the split is drawn per document by hash,
so with 5 expected the chance of none is e^-5, under 1 %."""


def evaluate(run: Run) -> dict:
    """Mean validation loss (nats per predicted token) and perplexity over the fixed held-out set. Collective.

    Returns ``{"val_loss", "val_ppl", "val_tokens"}`` and, for a causal LM whose data records the split's text
    bytes, ``val_bpb``: bits per UTF-8 byte, ``val_loss / ln 2 * tokens / bytes`` of the validation split
    (The Pile, Gao et al. 2020; nanochat), which does not depend on the tokenizer. NaN loss and perplexity when no
    rank has a validation token.
    """
    import torch

    engine = run.engine
    engine.eval()
    loss_sum, tokens = 0.0, 0.0
    rng_state = np.random.get_state()
    np.random.seed(run.cfg.seed)  # the same MLM masks at every evaluation, without disturbing training's RNG
    try:
        with torch.no_grad():
            for mb in run.val_batches:
                inputs = (run.eval_inputs or run.inputs)(mb)
                labels = np.asarray(inputs["labels"])
                labels = labels[:, 1:] if run.objective == "clm" else labels
                n = int((labels != IGNORE_INDEX).sum())
                loss = engine(**to_device(inputs, engine.device)).loss  # every rank runs every forward (ZeRO-3)
                if n:  # a batch of padding rows only (a split smaller than a micro batch per rank) has a NaN mean
                    loss_sum += loss.float().item() * n
                    tokens += n
    finally:
        np.random.set_state(rng_state)
        engine.train()
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens])
    loss = loss_sum / tokens if tokens else float("nan")
    result = {"val_loss": loss, "val_ppl": math.exp(loss) if tokens else float("nan"), "val_tokens": int(tokens)}
    if run.val_tokens_per_byte:
        result["val_bpb"] = loss / math.log(2) * run.val_tokens_per_byte
    return result


def require_validation_set(run: Run, manifest: dict | None) -> None:
    """Refuse a run whose validation set is empty (its loss would be NaN), naming the fraction that would give one.

    Raises:
        ConsistencyError: ``data.eval_batches`` > 0 and the validation split holds no sequence.
    """
    data = run.cfg.data
    if run.val_batches or not data.eval_batches:
        return
    if manifest is None:
        raise ConsistencyError(f"{data.raw_inputs[0]}: no held-out document in the corpus at "
                               f"data.raw_val_fraction={data.raw_val_fraction}, so validation loss would be NaN; "
                               "raise data.raw_val_fraction, or set data.eval_batches=0 to train without validation")
    raise _empty_split(data.path or data.blend[0].path, manifest)


def check_validation_split(cfg: TrainConfig, manifest: dict | None) -> None:
    """Before any rank starts: refuse a prepared dataset whose validation split is empty (``splits.val.sequences``
    of its manifest is 0) while ``data.eval_batches`` > 0. Blends and streamed corpora are checked by
    :func:`require_validation_set` once the ranks have their batches.

    Raises:
        ConsistencyError: see above.
    """
    val = ((manifest or {}).get("splits") or {}).get(VAL) or {}
    if manifest is not None and cfg.data.eval_batches and cfg.data.path and val.get("sequences") == 0:
        raise _empty_split(cfg.data.path, manifest)


def _empty_split(path: str, manifest: dict) -> ConsistencyError:
    documents = manifest["counts"]["documents"]
    fraction = manifest.get("config", {}).get("val_fraction", "?")
    suggest = min(0.5, max(0.005, VAL_DOCUMENTS_WANTED / max(documents, 1)))
    return ConsistencyError(f"{path}: the validation split holds 0 sequences (prep --val-fraction {fraction} of "
                            f"{documents} documents), so validation loss would be NaN; rerun lmforge prep with "
                            f"--val-fraction {suggest:.2g} (about {VAL_DOCUMENTS_WANTED} documents held out), or set "
                            "data.eval_batches=0 to train without validation")


def _bpb(result: dict) -> str:
    return f", {result['val_bpb']:.4f} bits per byte" if "val_bpb" in result else ""


def tokens_per_byte(manifest: dict | None, objective: str) -> float | None:
    """The validation split's tokens per UTF-8 byte of text, from the manifest (prep records both); None for a
    masked LM (its loss covers only the masked tokens, so a per-byte figure would not mean bits per byte) or
    data without the record (raw corpora, older prepared data)."""
    val = ((manifest or {}).get("splits") or {}).get(VAL) or {}
    if objective != "clm" or not val.get("text_bytes") or not val.get("tokens"):
        return None
    return val["tokens"] / val["text_bytes"]


class Evaluator:
    """Owns the evaluation cadence: once at the start of a run (not again on resume), every
    ``eval_every_steps`` before the last step, and at the end. Each result becomes a metrics record."""

    def __init__(self, run: Run, metrics: MetricsWriter):
        self.run, self.metrics = run, metrics
        self.every_steps, self.max_steps = run.cfg.eval_every_steps, run.cfg.max_steps

    def _record(self, step: int) -> dict:
        result = evaluate(self.run)
        self.metrics.write({"step": step, **result})
        return result

    def at_start(self, step: int, saved: dict | None) -> dict:
        """The start-of-run result: ``saved`` (from the resume checkpoint) when there is one, else measured now."""
        if saved is not None:
            return saved
        result = self._record(step)
        log_rank0("validation at start: loss %.4f, perplexity %.2f%s", result["val_loss"], result["val_ppl"], _bpb(result))
        return result

    def after_step(self, step: int) -> None:
        """Collective on the steps of the cadence."""
        if self.every_steps and step % self.every_steps == 0 and step < self.max_steps:
            self._record(step)

    def at_end(self, step: int, start: dict) -> dict:
        result = self._record(step)
        log_rank0("validation at end: loss %.4f, perplexity %.2f%s (start %.2f)", result["val_loss"], result["val_ppl"],
                  _bpb(result), start["val_ppl"])
        return result
