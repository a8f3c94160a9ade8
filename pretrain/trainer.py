"""The training loop: set-up, consistency checks, resume, train steps, evaluation, checkpoints.

Run dir layout (rank 0 writes all but the checkpoint shards)::

    config.yaml        resolved lmforge config       ds_config.json   generated DeepSpeed config
    model/config.json  transformers model config     metrics.jsonl    one record per logged step
    checkpoints/       complete checkpoints (pretrain.checkpoint)
    summary.json       start / end validation perplexity, tokens, steps (written last, only when finished)
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.errors import UserError
from data_prep.shards import check_shard_files
from lmforge_common import write_json_atomic
from data_prep.tokenizer.folder import TokenizerInfo, load_tokenizer_info
from pretrain import checkpoint
from pretrain.checkpoint import TrainState
from pretrain.checks import check_consistency
from pretrain.config import TrainConfig, to_yaml
from pretrain.data import ORDER_NAME
from pretrain.inputs import IGNORE_INDEX, MaskedLMInputs, causal_lm_inputs
from pretrain.distributed import DistInfo, all_reduce_sum, destroy_distributed, init_distributed, log_rank0
from pretrain.engine import build_ds_config, initialize_engine, return_large_frees_to_os
from pretrain.errors import ConsistencyError
from pretrain.flops import device_description, flops_per_token, peak_flops_per_device, peak_memory_gib
from pretrain.guard import DivergenceGuard
from pretrain.layout import CHECKPOINT_DIR, MODEL_CONFIG_DIR, SUMMARY_FILE
from pretrain.metrics import MetricsWriter
from pretrain.model import (build_model, build_model_config, count_parameters, load_model_config, objective_of,
                            padded_vocab_size)
from pretrain.sources import ShardSource, StreamingSource, describe_data
from pretrain.preemption import StopPolicy, requeue_slurm_job

log = logging.getLogger(__name__)
PROBE_TOKENS = 64


@dataclass
class Run:
    """Everything one rank's loop needs, built once by :func:`_setup`."""

    cfg: TrainConfig
    dist: DistInfo
    engine: object
    source: object
    """ShardSource or StreamingSource (pretrain.sources)."""
    val_batches: list
    """This rank's fixed validation micro batches."""
    seq_len: int
    global_batch: int
    """Sequences per optimizer step over all ranks."""
    fingerprints: dict
    objective: str
    """clm or mlm, from the model architecture."""
    flops_per_token: float
    """Training FLOPs per token, 6N + 12LHQT (pretrain.flops)."""
    peak_flops: float | None
    """Peak FLOP/s of one device, None when unknown (CPU)."""
    resume_from: Path | None
    """Complete checkpoint to resume from, or None for a fresh start."""
    resume_universal: bool
    """The resume checkpoint was saved at another world size (load through the universal format)."""
    exports: list = field(default_factory=list)
    """Rank 0: ``(checkpoint path, Popen)`` of background Hugging Face exports."""
    inputs: object = None
    """MicroBatch -> model inputs, built once by :func:`input_builder` (the MLM collator loads the tokenizer)."""

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.run_dir) / CHECKPOINT_DIR


def train(cfg: TrainConfig) -> dict:
    """Train per ``cfg`` on this rank; returns the summary (rank 0 also writes it to ``summary.json``).

    The summary has ``preempted: True`` when a signal or the time budget stopped the run after a
    save; the CLI then exits with :data:`~lmforge_common.EXIT_PREEMPTED`.
    """
    return_large_frees_to_os()  # before any tensor: freed parameters leave the resident set (CPU ranks)
    dist = init_distributed()
    try:
        return _train(_setup(cfg, dist))
    finally:
        destroy_distributed()


def preflight(cfg: TrainConfig, data: tuple[dict | None, str] | None = None) -> tuple[TokenizerInfo, object, int]:
    """Load tokenizer and manifest, build the model config and run every consistency check.

    Returns ``(tokenizer_info, model_config, seq_len)``; cheap (no weights), so launchers call it
    once before starting ranks. ``data``: :func:`~pretrain.sources.describe_data` of ``cfg.data`` when
    the caller already has it.

    Raises:
        ConsistencyError, ConfigError, InputError: see :func:`pretrain.checks.check_consistency`.
    """
    tok = load_tokenizer_info(cfg.data.tokenizer)
    manifest = (data or describe_data(_data_dict(cfg)))[0]
    seq_len = cfg.seq_len or manifest["seq_len"]
    overrides = dict(cfg.model.overrides)
    if cfg.model.init_from:
        model_config = load_model_config(cfg.model.init_from, overrides)
    else:
        rows = cfg.model.vocab_size or padded_vocab_size(tok.vocab_size)
        special = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
        model_config = build_model_config(cfg.model.preset, rows, seq_len, special, overrides)
    check_consistency(tok, manifest, model_config, seq_len, objective_of(model_config))
    return tok, model_config, seq_len


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
    data = describe_data(_data_dict(cfg))  # read once: the manifest for the checks, the fingerprint for checkpoints
    tok, model_config, seq_len = preflight(cfg, data)
    if dist.is_main:  # shards open lazily: find a missing or truncated one before step 1 (one stat each)
        for path in [cfg.data.path] * bool(cfg.data.path) + [b.path for b in cfg.data.blend]:
            check_shard_files(path)
    run_dir = Path(cfg.run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        write_json_atomic(run_dir / "ds_config.json", build_ds_config(cfg, dist.world_size, model_config=model_config))
        model_config.save_pretrained(str(run_dir / MODEL_CONFIG_DIR))
    resume_from = resume_point(cfg)
    universal = resume_from is not None and checkpoint.read_state(resume_from)["world_size"] != dist.world_size
    model = build_model(model_config, cfg.seed, cfg.model.init_from,
                        build_ds_config(cfg, dist.world_size, universal, model_config))  # ZeRO-3: built partitioned
    _use_fused_loss(model, cfg)
    fpt, n_params = flops_per_token(model_config, seq_len), count_parameters(model_config)
    engine = initialize_engine(model, cfg, dist.world_size, load_universal=universal)
    ds = cfg.deepspeed
    if cfg.data.path or cfg.data.blend:
        source = ShardSource(cfg.data.path, [(b.path, b.weight) for b in cfg.data.blend], cfg.seed)
    else:
        source = StreamingSource(list(cfg.data.raw_inputs), tok, seq_len, cfg.data.raw_text_column, cfg.data.raw_val_fraction)
    run = Run(cfg=cfg, dist=dist, engine=engine, objective=objective_of(model_config), resume_from=resume_from, resume_universal=universal, source=source,
              val_batches=source.val_batches(dist.rank, dist.world_size, ds.micro_batch_size, cfg.data.eval_batches),
              seq_len=seq_len,
              global_batch=ds.micro_batch_size * ds.gradient_accumulation_steps * dist.world_size,
              fingerprints={"tokenizer": tok.fingerprint, "data": data[1]},
              flops_per_token=fpt, peak_flops=peak_flops_per_device(cfg.peak_tflops))
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


def evaluate(run: Run) -> dict:
    """Mean validation loss (nats per predicted token) and perplexity over the fixed held-out set. Collective."""
    import torch

    engine, cfg = run.engine, run.cfg
    engine.eval()
    loss_sum, tokens = 0.0, 0
    rng_state = np.random.get_state()
    np.random.seed(cfg.seed)  # the same MLM masks at every evaluation, without disturbing training's RNG
    build = input_builder(run)
    try:
        with torch.no_grad():
            for mb in run.val_batches:
                inputs = build(mb)
                labels = inputs["labels"][:, 1:] if run.objective == "clm" else inputs["labels"]
                n = int((labels != IGNORE_INDEX).sum())
                loss_sum += engine(**to_device(inputs, engine.device)).loss.float().item() * n
                tokens += n
    finally:
        np.random.set_state(rng_state)
        engine.train()
    loss_sum, tokens = all_reduce_sum([loss_sum, float(tokens)])
    loss = loss_sum / tokens if tokens else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(loss) if tokens else float("nan"), "val_tokens": int(tokens)}


def to_device(arrays: dict[str, np.ndarray], device) -> dict:
    """numpy arrays -> torch tensors on ``device``; other values (flags) pass through."""
    import torch

    return {k: torch.from_numpy(v).to(device) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


def input_builder(run: Run):
    """MicroBatch -> model inputs for the run's objective (see pretrain.inputs); built once per run."""
    if run.inputs is None:
        cfg = run.cfg
        if run.objective == "mlm":
            m = cfg.mlm
            run.inputs = MaskedLMInputs(cfg.data.tokenizer, m.probability, m.mask_replace_prob, m.random_replace_prob,
                                        m.whole_word_mask)
        else:  # no KV cache: transformers derives the per-document mask from position_ids only without one
            run.inputs = lambda mb: {**causal_lm_inputs(mb, cfg.data.document_masking), "use_cache": False}
    return run.inputs


def train_step(engine, batches, build_inputs, accumulation_steps: int, index_log=None, step: int = 0,
               inject_nan: bool = False) -> tuple[float, bool]:
    """One optimizer step over ``accumulation_steps`` micro batches.

    Returns ``(mean loss on this rank, step applied)``; DeepSpeed skips the step on every rank when
    the global gradient norm is not finite (see :mod:`pretrain.guard`).
    """
    total = 0.0
    for _ in range(accumulation_steps):
        mb = next(batches)
        if index_log is not None:
            index_log.write(f"{step}\t{','.join(map(str, mb.sample_indices.tolist()))}\n")
        loss = engine(**to_device(build_inputs(mb), engine.device)).loss
        if inject_nan:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        total += loss.float().item()
    return total / accumulation_steps, engine.was_step_applied()


def _probe(run: Run):
    """Collective forward of a fixed probe batch; rank 0 gets ``{tensors, metadata}`` for ``probe.safetensors``."""
    import torch

    if run.val_batches:
        rows = run.val_batches[0].input_ids
    else:
        rows = next(run.source.train_batches(run.dist.rank, run.dist.world_size, run.cfg.deepspeed.micro_batch_size,
                                             run.cfg.seed, 0)).input_ids
    ids = np.ascontiguousarray(rows[:2, :PROBE_TOKENS])
    x = torch.from_numpy(ids).to(run.engine.device)
    run.engine.eval()
    with torch.no_grad():
        logits = run.engine(input_ids=x).logits.float().cpu()
    run.engine.train()
    if not run.dist.is_main:
        return None
    from pretrain.export.verify import probe_metadata

    return {"tensors": {"input_ids": x.cpu(), "logits": logits},
            "metadata": probe_metadata(run.cfg.deepspeed.precision, run.engine.device)}


def save_checkpoint(run: Run, state: TrainState, extras: dict) -> Path:
    """Collective atomic save of ``state`` (see :mod:`pretrain.checkpoint`), then pruning on rank 0."""
    cfg = run.cfg
    path = checkpoint.save(run.engine, run.checkpoint_dir, state, run.dist.rank,
                           {"world_size": run.dist.world_size, "fingerprints": run.fingerprints, "data_order": ORDER_NAME,
                            "config_yaml": to_yaml(cfg), "hardware": f"{run.dist.world_size} x {device_description()}",
                            **extras},
                           probe_fn=lambda: _probe(run), crash_point=cfg.debug.crash_in_save)
    if run.dist.is_main:
        every = cfg.checkpoint.export_every_steps
        if every and state.step % every == 0:
            from pretrain.export.core import spawn_export

            run.exports.append((path, spawn_export(path, Path(cfg.run_dir) / "hf" / path.name)))
            log_rank0("exporting %s to hf/%s in the background", path.name, path.name)
        running = [p for p, proc in run.exports if proc.poll() is None]
        checkpoint.prune(run.checkpoint_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every_steps, protect=running)
    log_rank0("checkpoint %s saved", path.name)
    return path


def wait_for_exports(run: Run) -> None:
    """Rank 0: wait for background exports; a failed one is logged with its log file, not raised."""
    for path, proc in run.exports:
        if proc.wait() != 0:
            log.warning("background export of %s failed (exit %d): see %s", path.name, proc.returncode,
                        Path(run.cfg.run_dir) / "hf" / f"{path.name}.export.log")


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from per ``checkpoint.resume``, or None for a fresh start.

    Raises:
        UserError: ``never`` with checkpoints present, or a named checkpoint that is not complete.
    """
    mode = cfg.checkpoint.resume
    checkpoint_dir = Path(cfg.run_dir) / CHECKPOINT_DIR
    newest = checkpoint.latest_complete(checkpoint_dir)
    if mode == "auto":
        return newest
    if mode == "never":
        if newest is not None:
            raise UserError(f"{checkpoint_dir}: holds checkpoint {newest.name} and checkpoint.resume=never; "
                            "use a new run_dir or resume")
        return None
    path = Path(mode) if os.sep in mode else checkpoint_dir / mode
    if not (path / checkpoint.STATE_FILE).is_file():
        raise UserError(f"{path}: not a complete checkpoint (no {checkpoint.STATE_FILE})")
    return path


def _resume(run: Run, tag_dir: Path) -> tuple[TrainState, dict]:
    saved = checkpoint.read_state(tag_dir)
    if saved.get("data_order") != ORDER_NAME:
        raise ConsistencyError(f"{tag_dir}: checkpoint was trained with sample order {saved.get('data_order')!r}, "
                               f"this lmforge uses {ORDER_NAME!r}; resuming would repeat and skip samples")
    if saved["fingerprints"] != run.fingerprints:
        raise ConsistencyError(f"{tag_dir}: checkpoint was trained with tokenizer/data {saved['fingerprints']}, "
                               f"now {run.fingerprints}; refusing to resume on other data")
    state = checkpoint.load(run.engine, tag_dir, run.dist.rank, universal=run.resume_universal)
    log_rank0("resumed from %s: step %d, %d consumed samples (saved at world size %d, now %d)", tag_dir.name,
              state.step, state.consumed_samples, saved["world_size"], run.dist.world_size)
    return state, {"val_start": saved.get("val_start")}


def _train(run: Run) -> dict:
    from tqdm.auto import tqdm

    cfg, dist, engine = run.cfg, run.dist, run.engine
    run_dir = Path(cfg.run_dir)
    state, extras = TrainState(), {}
    if run.resume_from is not None:
        state, extras = _resume(run, run.resume_from)
    metrics = MetricsWriter(run_dir, dist.is_main, cfg.wandb_project, {"config_yaml": to_yaml(cfg)})
    index_log = None
    if cfg.data.save_data_indices:
        (run_dir / "data-indices").mkdir(parents=True, exist_ok=True)
        index_log = open(run_dir / "data-indices" / f"rank{dist.rank}.tsv", "a", encoding="utf-8")
    stop = StopPolicy(list(cfg.preemption.signals), cfg.preemption.max_minutes, cfg.checkpoint.save_every_minutes)
    guard = DivergenceGuard(cfg.guard.max_consecutive_nonfinite, cfg.guard.spike_factor, cfg.guard.spike_window)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
               disable=not (dist.is_main and cfg.show_progress))
    try:
        if extras.get("val_start") is None:
            extras["val_start"] = evaluate(run)
            metrics.write({"step": state.step, **extras["val_start"]})
            log_rank0("validation at start: loss %.4f, perplexity %.2f", extras["val_start"]["val_loss"], extras["val_start"]["val_ppl"])
        batches = run.source.train_batches(dist.rank, dist.world_size, cfg.deepspeed.micro_batch_size, cfg.seed,
                                           state.consumed_samples)
        build_inputs = input_builder(run)
        t_start = t_log = time.perf_counter()
        tokens_at_start, loss_acc, steps_acc, saved_step = state.tokens, 0.0, 0, state.step
        tokens_resumed = state.tokens
        while state.step < cfg.max_steps:
            inject = dist.is_main and (state.step + 1) in cfg.debug.inject_nan_at_steps
            loss, applied = train_step(engine, batches, build_inputs, cfg.deepspeed.gradient_accumulation_steps, index_log,
                                       state.step, inject)
            state.step += 1
            state.consumed_samples += run.global_batch
            state.tokens += run.global_batch * run.seq_len
            state.skipped_steps += int(not applied)
            if guard.update(state.step, applied, loss):
                log_rank0("step %d: loss spike %.4f (> %.1fx the mean of the last %d steps)", state.step, loss,
                          cfg.guard.spike_factor, cfg.guard.spike_window)
            if applied:
                loss_acc, steps_acc = loss_acc + loss, steps_acc + 1
            bar.update(1)
            if state.step == cfg.debug.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if state.step % cfg.log_every_steps == 0 or state.step == cfg.max_steps:
                (loss_sum,) = all_reduce_sum([loss_acc / max(steps_acc, 1)])
                now = time.perf_counter()
                record = {"step": state.step, "loss": loss_sum / dist.world_size if steps_acc else float("nan"),
                          "lr": engine.get_lr()[0], "tokens_per_s": (state.tokens - tokens_at_start) / (now - t_log),
                          "consumed_samples": state.consumed_samples, "tokens": state.tokens,
                          "skipped_steps": state.skipped_steps, "loss_spikes": guard.spikes,
                          "peak_mem_gib": round(peak_memory_gib(), 3)}
                if run.peak_flops:
                    record["mfu"] = record["tokens_per_s"] * run.flops_per_token / (dist.world_size * run.peak_flops)
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                loss_acc, steps_acc, t_log, tokens_at_start = 0.0, 0, now, state.tokens
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0 and state.step < cfg.max_steps:
                metrics.write({"step": state.step, **evaluate(run)})
            reason, time_due = stop.poll()
            step_due = cfg.checkpoint.save_every_steps and state.step % cfg.checkpoint.save_every_steps == 0
            if (reason or time_due or step_due) and state.step < cfg.max_steps:
                save_checkpoint(run, state, extras)
                stop.mark_saved()
                saved_step = state.step
            if reason:
                log_rank0("stopping at step %d on %s: checkpoint saved, exit code %d", state.step, reason, EXIT_PREEMPTED)
                if cfg.preemption.requeue and dist.is_main:
                    requeue_slurm_job()
                return {"preempted": True, "reason": reason, "steps": state.step}
        bar.close()
        elapsed_s = time.perf_counter() - t_start
        end_eval = evaluate(run)
        metrics.write({"step": state.step, **end_eval})
        start_eval = extras["val_start"]
        log_rank0("validation at end: loss %.4f, perplexity %.2f (start %.2f)", end_eval["val_loss"], end_eval["val_ppl"],
                  start_eval["val_ppl"])
        final = save_checkpoint(run, state, extras) if saved_step != state.step else checkpoint.latest_complete(run.checkpoint_dir)
        summary = {"preempted": False, "steps": state.step, "consumed_samples": state.consumed_samples, "tokens": state.tokens,
                   "skipped_steps": state.skipped_steps, "elapsed_s": round(elapsed_s, 3),
                   "tokens_per_s": (state.tokens - tokens_resumed) / max(elapsed_s, 1e-9),
                   "world_size": dist.world_size, "checkpoint_tag": final.name, "flops_per_token": run.flops_per_token,
                   "val_loss_start": start_eval["val_loss"], "val_ppl_start": start_eval["val_ppl"],
                   "val_loss_end": end_eval["val_loss"], "val_ppl_end": end_eval["val_ppl"]}
        if dist.is_main:
            wait_for_exports(run)
            write_json_atomic(run_dir / SUMMARY_FILE, summary)
        return summary
    finally:
        bar.close()
        stop.restore()
        metrics.close()
        if index_log is not None:
            index_log.close()


def read_summary(run_dir: str | Path) -> dict:
    """The ``summary.json`` of a finished run."""
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
