"""Training on one rank: set-up and consistency checks (:func:`preflight`, ``_setup``), then the loop.

The loop (``_train``) reads as the algorithm; each concern is a component that owns its cadence:
:class:`~pretrain.faults.FaultInjector` (``debug.*``), :class:`~pretrain.guard.DivergenceGuard`,
:class:`~pretrain.metrics.MetricsLogger` (loss, throughput, MFU, progress bar),
:class:`~pretrain.evaluator.Evaluator`, :class:`~pretrain.preemption.StopPolicy` (signals, time
budget, Slurm requeue) and :class:`~pretrain.checkpointer.Checkpointer` (save cadence, pruning,
background exports, resume). The optimizer step itself is :func:`pretrain.step.train_step`.

Run dir layout (rank 0 writes all but the checkpoint shards)::

    config.yaml        resolved lmforge config       ds_config.json   generated DeepSpeed config
    model/config.json  transformers model config     metrics.jsonl    one record per logged step
    checkpoints/       complete checkpoints (pretrain.checkpoint)
    summary.json       start / end validation perplexity, tokens, steps (written last, only when finished)
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
from pathlib import Path
from typing import IO, Any, Iterator, Literal

from data_prep.shards import check_shard_files
from data_prep.tokenizer.folder import TokenizerInfo, load_tokenizer_info
from lmforge_common import write_json_atomic
from pretrain import checkpoint
from pretrain.checkpoint import TrainState
from pretrain.checkpointer import Checkpointer, own_run_files, resume, resume_point, rollback, run_tokenizer_dir
from pretrain.checks import check_consistency
from pretrain.config import TrainConfig, to_yaml
from pretrain.data import MicroBatch
from pretrain.distributed import (
    DistInfo,
    destroy_distributed,
    init_distributed,
    log_rank0,
    set_collective_timeout,
)
from pretrain.engine import build_ds_config, initialize_engine, return_large_frees_to_os, returns_freed_memory
from pretrain.errors import ConfigError
from pretrain.evaluator import Evaluator, check_validation_split, require_validation_set, tokens_per_byte
from pretrain.faults import FaultInjector
from pretrain.flops import flops_per_token, peak_flops_per_device
from pretrain.guard import DivergenceGuard, RollbackRequest
from pretrain.heartbeat import Heartbeat, is_timeout, stall_error
from pretrain.layout import CHECKPOINT_DIR, DS_CONFIG_FILE, MODEL_CONFIG_DIR, RUN_CONFIG_FILE, SUMMARY_FILE
from pretrain.metrics import MetricsLogger, MetricsWriter
from pretrain.model import (
    attention_problem,
    build_model,
    build_model_config,
    count_parameters,
    load_model_config,
    objective_of,
    padded_vocab_size,
)
from pretrain.model_files import write_model_files
from pretrain.preemption import StopPolicy, poll_every_steps
from pretrain.run import Run
from pretrain.sources import ShardSource, StreamingSource, describe_data, read_manifests
from pretrain.step import index_log_path, logged_indices, make_input_builder, train_step

__all__ = ["CHECKPOINT_DIR", "preflight", "read_summary", "resume_point", "train"]
log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict:
    """Train per ``cfg`` on this rank; returns the summary (rank 0 also writes it to ``summary.json``).

    The summary has ``preempted: True`` when a signal or the time budget stopped the run after a
    save; the CLI then exits with :data:`~lmforge_common.EXIT_PREEMPTED`.

    Raises:
        CollectiveTimeout: a collective waited ``distributed.timeout_minutes``; names the ranks that did not arrive.
    """
    if returns_freed_memory(cfg.deepspeed.return_freed_memory, cfg.deepspeed.zero_stage):
        return_large_frees_to_os()  # before any tensor: freed parameters leave the resident set (CPU ranks)
    timeout_minutes = cfg.distributed.timeout_minutes
    dist = init_distributed(timeout_minutes)
    heartbeat = Heartbeat(cfg.run_dir, dist.rank)
    try:
        return _train(_setup(cfg, dist), heartbeat)
    except RuntimeError as err:  # torch.distributed.DistBackendError is one
        if not is_timeout(err):
            raise
        raise stall_error(heartbeat, dist.world_size, timeout_minutes) from err
    finally:
        destroy_distributed()


def preflight(cfg: TrainConfig, data: tuple[dict | None, str] | None = None,
              device: str | None = None) -> tuple[TokenizerInfo, Any, int]:
    """Load tokenizer and manifest, build the model config and run every consistency check.

    Returns ``(tokenizer_info, model_config, seq_len)``; cheap (no weights), so launchers call it
    once before starting ranks. ``data``: :func:`~pretrain.sources.describe_data` of ``cfg.data`` when
    the caller already has it. ``device``: ``cuda`` or ``cpu``, where the ranks will train (default: CUDA
    when this process sees a GPU), for the attention check.

    Raises:
        ConsistencyError, ConfigError, InputError: see :func:`pretrain.checks.check_consistency`; an empty
            validation split (:func:`pretrain.evaluator.check_validation_split`); ``model.attention`` that
            cannot train on ``device`` (:func:`pretrain.model.attention_problem`).
    """
    tok = load_tokenizer_info(run_tokenizer_dir(cfg))
    manifest = (data or describe_data(_data_dict(cfg)))[0]
    seq_len = cfg.seq_len or (manifest or {})["seq_len"]  # a raw corpus has no manifest: config validation requires seq_len
    overrides = dict(cfg.model.overrides)
    if cfg.model.init_from:
        model_config = load_model_config(cfg.model.init_from, overrides)
    else:
        rows = cfg.model.vocab_size or padded_vocab_size(tok.vocab_size)
        special = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
        model_config = build_model_config(cfg.model.preset, rows, seq_len, special, overrides)
    check_consistency(tok, manifest, model_config, seq_len, objective_of(model_config))
    check_validation_split(cfg, manifest)
    _check_attention(cfg, model_config, device)
    return tok, model_config, seq_len


def _check_attention(cfg: TrainConfig, model_config, device: str | None) -> None:
    import torch

    problem = attention_problem(cfg.model.attention, objective_of(model_config), cfg.data.document_masking,
                                device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if problem:
        raise ConfigError(problem)


def _data_dict(cfg: TrainConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg.data)


def _use_fused_loss(model, cfg: TrainConfig) -> None:
    """The chunked lm_head + cross-entropy for training steps (pretrain.loss), where it applies."""
    from pretrain.loss import enable_fused_loss, fused_loss_unsupported

    if not cfg.model.loss_chunk_tokens:
        return
    reason = fused_loss_unsupported(model, objective_of(model.config), cfg.deepspeed.zero_stage)
    if reason:
        log_rank0("loss: transformers' own (fused chunked loss not used: %s)", reason)
        return
    enable_fused_loss(model, cfg.model.loss_chunk_tokens)
    log_rank0("loss: fused lm_head + cross-entropy in chunks of %d tokens", cfg.model.loss_chunk_tokens)


def _setup(cfg: TrainConfig, dist: DistInfo) -> Run:
    cfg = own_run_files(cfg, dist.is_main)  # the run folder stands on its own: absolute data paths, own tokenizer
    manifests = read_manifests(_data_dict(cfg))  # each parsed once, passed to the checks and the readers
    data = describe_data(_data_dict(cfg), manifests)  # the manifest for the checks, the fingerprint for checkpoints
    tok, model_config, seq_len = preflight(cfg, data)
    if dist.is_main:  # shards open lazily: find a missing or truncated one before step 1 (one stat each)
        for path, manifest in manifests.items():
            check_shard_files(path, manifest=manifest)
    run_dir = Path(cfg.run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_CONFIG_FILE).write_text(to_yaml(cfg))
        write_json_atomic(run_dir / DS_CONFIG_FILE, build_ds_config(cfg, dist.world_size, model_config=model_config))
        model_config.save_pretrained(str(run_dir / MODEL_CONFIG_DIR))
    resume_from = resume_point(cfg)
    universal = resume_from is not None and checkpoint.read_state(resume_from)["world_size"] != dist.world_size
    model = build_model(model_config, cfg.seed, cfg.model.init_from,
                        build_ds_config(cfg, dist.world_size, universal, model_config),  # ZeRO-3: built partitioned
                        attention=cfg.model.attention)
    if dist.is_main:  # config.json again, now naming the model's class, and generation_config.json
        write_model_files(model, run_dir / MODEL_CONFIG_DIR)
    _use_fused_loss(model, cfg)
    fpt, n_params = flops_per_token(model_config, seq_len), count_parameters(model_config)
    engine = initialize_engine(model, cfg, dist.world_size, load_universal=universal)
    set_collective_timeout(cfg.distributed.timeout_minutes)
    ds = cfg.deepspeed
    source: ShardSource | StreamingSource
    if cfg.data.path or cfg.data.blend:
        source = ShardSource.from_config(cfg.data, cfg.seed, ds.micro_batch_size * ds.gradient_accumulation_steps * dist.world_size,
                                         cfg.max_steps, manifests)
    else:
        source = StreamingSource(list(cfg.data.raw_inputs), tok, seq_len, cfg.data.raw_text_column, cfg.data.raw_val_fraction)
    objective: Literal["clm", "mlm"] = "mlm" if objective_of(model_config) == "mlm" else "clm"
    run = Run(cfg=cfg, dist=dist, engine=engine, objective=objective, resume_from=resume_from,
              resume_universal=universal, source=source, inputs=make_input_builder(cfg, objective, model_config),
              eval_inputs=make_input_builder(cfg, objective, model_config, evaluation=True)
              if objective == "mlm" and cfg.mlm.eval_probability else None,
              val_tokens_per_byte=tokens_per_byte(data[0], objective),
              val_batches=source.val_batches(dist.rank, dist.world_size, ds.micro_batch_size, cfg.data.eval_batches),
              seq_len=seq_len,
              global_batch=ds.micro_batch_size * ds.gradient_accumulation_steps * dist.world_size,
              fingerprints={"tokenizer": tok.fingerprint, "data": data[1]},
              flops_per_token=fpt, peak_flops=peak_flops_per_device(cfg.peak_tflops))
    require_validation_set(run, data[0])
    log_rank0("model %s: %.2fM parameters, vocab %d rows (tokenizer %d), seq_len %d", cfg.model.preset,
              n_params / 1e6, model_config.vocab_size, tok.vocab_size, seq_len)
    log_rank0("batch: micro batch %d x accumulation %d x world size %d = global batch %d sequences = %d tokens; "
              "ZeRO stage %d, %s", ds.micro_batch_size, ds.gradient_accumulation_steps, dist.world_size, run.global_batch,
              run.global_batch * seq_len, ds.zero_stage, ds.precision)
    log_rank0("FLOPs per token %.3g (6N + 12LHQT); device peak %s", run.flops_per_token,
              f"{run.peak_flops / 1e12:.0f} TFLOP/s" if run.peak_flops else "unknown (no MFU)")
    n_train = source.num_train_sequences
    log_rank0("data: %s train sequences, %d validation micro batches per rank%s",
              n_train if n_train is not None else "streamed", len(run.val_batches),
              f" ({cfg.max_steps * run.global_batch / n_train:.2f} epochs planned)" if n_train else "")
    return run


def _train(run: Run, heartbeat: Heartbeat) -> dict:
    """The algorithm: evaluate; optimizer steps until ``max_steps`` or an agreed stop; evaluate and save.

    Each component owns its cadence and its side of the step: fault injection, the divergence guard
    (and its rollbacks), metrics, evaluation, the stop policy (signals, time budget) and the checkpointer.
    """
    cfg, dist = run.cfg, run.dist
    state, extras = resume(run, run.resume_from) if run.resume_from is not None else (TrainState(), {})
    with contextlib.ExitStack() as closing:
        writer = MetricsWriter(cfg.run_dir, dist.is_main, cfg.wandb_project, {"config_yaml": to_yaml(cfg)})
        closing.callback(writer.close)
        pre = cfg.preemption
        stop = StopPolicy(list(pre.signals), pre.max_minutes, pre.requeue,
                          poll_every_steps(pre.poll_every_steps, str(run.engine.device).split(":")[0]), cfg.max_steps)
        closing.callback(stop.restore)
        faults = FaultInjector(cfg.debug, dist, run.engine)
        faults.at_start(state, run.global_batch)
        checkpointer = Checkpointer(run, saved_step=state.step, crash_point=faults.crash_in_save,
                                    write_error=(faults.write_error_in_save, faults.write_error_at_step))
        g = cfg.guard
        guard = DivergenceGuard(g.max_consecutive_nonfinite, g.spike_factor, g.spike_window, g.rollback,
                                g.spike_patience, g.max_rollbacks, state.rollbacks)
        evaluator = Evaluator(run, writer)
        extras["val_start"] = evaluator.at_start(state.step, extras.get("val_start"))
        index_log = _index_log(run, closing)
        batches = _training_batches(run, state, index_log)
        metrics = MetricsLogger(writer, run, state)
        closing.callback(metrics.close)
        heartbeat.beat(state.step)  # this process is alive: a rank hanging before its first step shows as stale
        while state.step < cfg.max_steps:
            if faults.skip_now(state):
                batches = _training_batches(run, state, index_log)
            faults.before_step(state.step + 1)
            loss, applied = train_step(run.engine, batches, run.inputs, cfg.deepspeed.gradient_accumulation_steps)
            state.advance(run.global_batch, run.tokens_per_step, applied)
            heartbeat.beat(state.step)
            request = guard.update(state.step, applied, _guard_loss(run, loss))
            if request is not None:
                state = _roll_back(run, request, guard.rollbacks_done, checkpointer, writer)
                batches = _training_batches(run, state, index_log)
                continue
            faults.after_step(state.step)
            metrics.after_step(state, loss, applied, guard.spikes)
            evaluator.after_step(state.step)
            decision = stop.poll(state.step, checkpointer.timer_due())
            saved = checkpointer.after_step(state, extras, decision)
            if decision.reason:
                return stop.stopped(state.step, decision.reason, saved, dist.is_main)
        metrics.close()
        elapsed_s, tokens_per_s = metrics.throughput(state)
        end_eval = evaluator.at_end(state.step, extras["val_start"])
        final = checkpointer.final(state, extras)
        summary = _summary(run, state, elapsed_s, tokens_per_s, final, extras["val_start"], end_eval)
        if dist.is_main:
            checkpointer.wait_for_exports()
            write_json_atomic(Path(cfg.run_dir) / SUMMARY_FILE, summary)
        return summary


def _guard_loss(run: Run, loss: float) -> float:
    """The loss the divergence guard judges: with ``guard.rollback``, the mean over all ranks (one all-reduce),
    so every rank takes the same decision; otherwise this rank's."""
    if not run.cfg.guard.rollback:
        return loss
    from pretrain.distributed import all_reduce_sum

    return all_reduce_sum([loss])[0] / run.dist.world_size


def _roll_back(run: Run, request: RollbackRequest, rollbacks: int, checkpointer: Checkpointer,
               writer: MetricsWriter) -> TrainState:
    """Collective: restore the newest checkpoint before the spike, skip ``guard.skip_batches`` global batches
    after it (recorded in the state, so the next checkpoint carries it); one log line and one metrics record."""
    state, path = rollback(run, request.first_bad_step, checkpointer.exporting() if run.dist.is_main else ())
    skip = run.cfg.guard.skip_batches
    state.rollbacks = rollbacks
    state.skipped_samples += skip * run.global_batch
    checkpointer.saved_step = state.step
    log_rank0("step %d: %s from step %d; rolled back to %s and skipping %d global batches (%d sequences); rollback %d "
              "of guard.max_rollbacks=%d", request.step, request.reason, request.first_bad_step, path.name, skip,
              skip * run.global_batch, rollbacks, run.cfg.guard.max_rollbacks)
    writer.write({"step": request.step, "rollback_to_step": state.step, "rollbacks": rollbacks,
                  "skipped_samples": state.skipped_samples})
    return state


def _index_log(run: Run, closing: contextlib.ExitStack) -> IO[str] | None:
    """This rank's sample index log (``data.save_data_indices``), open for the whole run, or None; line-buffered,
    so a kill -9 loses at most the line being written."""
    if not run.cfg.data.save_data_indices:
        return None
    return closing.enter_context(open(index_log_path(run.cfg.run_dir, run.dist.rank), "a", buffering=1, encoding="utf-8"))


def _training_batches(run: Run, state: TrainState, index_log: IO[str] | None) -> Iterator[MicroBatch]:
    """This rank's micro batches from ``state.data_position`` on (trained plus skipped sequences), logged per step
    to ``index_log`` when given."""
    cfg = run.cfg
    batches = run.source.train_batches(run.dist.rank, run.dist.world_size, cfg.deepspeed.micro_batch_size, cfg.seed,
                                       state.data_position)
    if cfg.debug.prebuilt_batches:
        remaining = (cfg.max_steps - state.step) * cfg.deepspeed.gradient_accumulation_steps
        batches = iter(list(itertools.islice(batches, remaining)))
    if index_log is None:
        return batches
    return logged_indices(batches, index_log, state.step, cfg.deepspeed.gradient_accumulation_steps)


def _summary(run: Run, state: TrainState, elapsed_s: float, tokens_per_s: float, final: Path, start_eval: dict,
             end_eval: dict) -> dict:
    """The ``summary.json`` of a finished run (``tokens_per_s``, ``elapsed_s``: this start only)."""
    return {"preempted": False, "steps": state.step, "consumed_samples": state.consumed_samples, "tokens": state.tokens,
            "skipped_steps": state.skipped_steps, "rollbacks": state.rollbacks, "skipped_samples": state.skipped_samples,
            "elapsed_s": round(elapsed_s, 3), "tokens_per_s": tokens_per_s,
            "world_size": run.dist.world_size, "checkpoint_tag": final.name, "flops_per_token": run.flops_per_token,
            "val_loss_start": start_eval["val_loss"], "val_ppl_start": start_eval["val_ppl"],
            "val_loss_end": end_eval["val_loss"], "val_ppl_end": end_eval["val_ppl"],
            **({"val_bpb_start": start_eval["val_bpb"], "val_bpb_end": end_eval["val_bpb"]} if "val_bpb" in end_eval
               and "val_bpb" in start_eval else {})}


def read_summary(run_dir: str | Path) -> dict:
    """The ``summary.json`` of a finished run."""
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
