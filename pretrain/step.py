"""One optimizer step, and what feeds it: model inputs on the device, the micro batch stream, its index log."""
from __future__ import annotations

from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from pretrain.config import TrainConfig
from pretrain.data import MicroBatch
from pretrain.inputs import MaskedLMInputs, causal_lm_inputs
from pretrain.run import Engine, InputBuilder

COMPILE_LOGGED = "lmforge_compile_time_logged"
"""Engine attribute set once the first compiled step's time was logged (logged once per engine)."""

INDEX_LOG_DIR = "data-indices"
"""Run-dir folder of the per-rank sample index logs (``data.save_data_indices``)."""


def to_device(arrays: dict, device) -> dict:
    """numpy arrays -> torch tensors on ``device``, also inside a nested dict (a per-layer-type attention mask);
    other values (flags) pass through."""
    import torch

    return {k: to_device(v, device) if isinstance(v, dict) else torch.from_numpy(v).to(device)
            if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


def make_input_builder(cfg: TrainConfig, objective: str, model_config=None, evaluation: bool = False) -> InputBuilder:
    """MicroBatch -> model inputs for ``objective`` (clm or mlm; see pretrain.inputs).

    Masked LMs mask ``mlm.probability`` of the tokens in training and ``mlm.eval_probability`` (when set) in
    validation; with ``data.document_masking`` each token attends within its document only.
    """
    if objective == "mlm":
        m = cfg.mlm
        probability = m.eval_probability if evaluation and m.eval_probability else m.probability
        mlm: InputBuilder = MaskedLMInputs.for_model(cfg.data.tokenizer, model_config, cfg.data.document_masking, probability,
                                                     m.mask_replace_prob, m.random_replace_prob, m.whole_word_mask)
        return mlm
    document_masking = cfg.data.document_masking
    # no KV cache: transformers derives the per-document mask from position_ids only without one
    def causal(mb: MicroBatch) -> dict[str, Any]:
        return {**causal_lm_inputs(mb, document_masking), "use_cache": False}

    return causal


def train_step(engine: Engine, batches: Iterator[MicroBatch], build_inputs: InputBuilder,
               accumulation_steps: int) -> tuple[float, bool]:
    """One optimizer step over ``accumulation_steps`` micro batches.

    Returns ``(mean loss on this rank in nats per predicted token, step applied)``; DeepSpeed skips
    the step on every rank when the global gradient norm is not finite (see :mod:`pretrain.guard`).
    The micro batches' losses are summed on the device in float64 and read once per step (one
    host-device sync per optimizer step, not per micro batch); float64 sums the float32 losses as
    Python floats would, so the result is the same to the bit.
    """
    if getattr(engine, "is_compiled", False) and not getattr(engine, COMPILE_LOGGED, False):
        return _first_compiled_step(engine, batches, build_inputs, accumulation_steps)
    total: Any = None
    for _ in range(accumulation_steps):
        loss = engine(**to_device(build_inputs(next(batches)), engine.device)).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().double() if total is None else total + loss.detach().double()
    return total.item() / accumulation_steps, engine.was_step_applied()


def logged_indices(batches: Iterator[MicroBatch], log: IO[str], first_step: int,
                   accumulation_steps: int) -> Iterator[MicroBatch]:
    """``batches``, writing ``step<TAB>comma-separated sample indices`` to ``log`` for each micro batch;
    ``step`` counts optimizer steps done before it (``first_step`` for the first)."""
    for i, mb in enumerate(batches):
        log.write(f"{first_step + i // accumulation_steps}\t{','.join(map(str, mb.sample_indices.tolist()))}\n")
        yield mb


def index_log_path(run_dir: str | Path, rank: int) -> Path:
    """This rank's sample index log; the folder is created."""
    folder = Path(run_dir) / INDEX_LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"rank{rank}.tsv"


def _first_compiled_step(engine: Engine, batches: Iterator[MicroBatch], build_inputs: InputBuilder,
                         accumulation_steps: int) -> tuple[float, bool]:
    """:func:`train_step` timed: the first step of a compiled engine includes torch.compile's work, logged once."""
    import time

    from pretrain.distributed import log_rank0

    setattr(engine, COMPILE_LOGGED, True)
    start_s = time.perf_counter()
    result = train_step(engine, batches, build_inputs, accumulation_steps)
    log_rank0("compile: the first step took %.1f s (torch.compile's tracing and code generation included)",
              time.perf_counter() - start_s)
    return result
