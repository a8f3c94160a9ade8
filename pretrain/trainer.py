"""The training loop: set-up, consistency checks, train steps, evaluation, checkpoints, probe.

Run dir layout (rank 0 writes all but the checkpoint shards)::

    config.yaml        resolved lmforge config       ds_config.json   generated DeepSpeed config
    model/config.json  transformers model config     metrics.jsonl    one record per logged step
    checkpoints/       DeepSpeed ZeRO checkpoints    probe.safetensors final logits on a probe batch
    summary.json       start / end validation perplexity, tokens, steps (written last)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.shards import ShardReader, read_manifest, write_json_atomic
from data_prep.tokenizer import load_tokenizer_info
from pretrain.checks import check_consistency
from pretrain.config import TrainConfig, to_yaml
from pretrain.data import eval_batches, micro_batches
from pretrain.distributed import DistInfo, all_reduce_sum, destroy_distributed, init_distributed, log_rank0
from pretrain.engine import build_ds_config, initialize_engine
from pretrain.metrics import MetricsWriter
from pretrain.model import build_model, build_model_config, count_parameters, padded_vocab_size

CHECKPOINT_DIR = "checkpoints"
MODEL_CONFIG_DIR = "model"
PROBE_FILE = "probe.safetensors"
SUMMARY_FILE = "summary.json"
PROBE_TOKENS = 64


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    consumed_samples: int = 0
    """Sequences consumed by all ranks together."""
    tokens: int = 0
    """Tokens consumed by all ranks together."""


def train(cfg: TrainConfig) -> dict:
    """Train per ``cfg`` on this rank; returns the summary (also written by rank 0 to ``summary.json``)."""
    dist = init_distributed()
    try:
        return _train(cfg, dist)
    finally:
        destroy_distributed()


def preflight(cfg: TrainConfig):
    """Load tokenizer and manifest, build the model config and run every consistency check.

    Returns ``(tokenizer_info, model_config, seq_len)``; cheap (no weights), so launchers call it
    once before starting ranks.

    Raises:
        ConsistencyError, ConfigError, InputError: see :func:`pretrain.checks.check_consistency`.
    """
    tok = load_tokenizer_info(cfg.data.tokenizer)
    manifest = read_manifest(cfg.data.path)
    seq_len = cfg.seq_len or manifest["seq_len"]
    rows = cfg.model.vocab_size or padded_vocab_size(tok.vocab_size)
    special = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    model_config = build_model_config(cfg.model.preset, rows, seq_len, special, dict(cfg.model.overrides))
    check_consistency(tok, manifest, model_config, seq_len)
    return tok, model_config, seq_len


def _setup(cfg: TrainConfig, dist: DistInfo):
    tok, model_config, seq_len = preflight(cfg)
    rows = model_config.vocab_size
    run_dir = Path(cfg.run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        write_json_atomic(run_dir / "ds_config.json", build_ds_config(cfg, dist.world_size))
        model_config.save_pretrained(str(run_dir / MODEL_CONFIG_DIR))
    model = build_model(model_config, cfg.seed)
    engine = initialize_engine(model, cfg, dist.world_size)
    train_reader = ShardReader(cfg.data.path, "train")
    val_reader = ShardReader(cfg.data.path, "val")
    ds = cfg.deepspeed
    global_batch = ds.micro_batch_size * ds.gradient_accumulation_steps * dist.world_size
    log_rank0("model %s: %.2fM parameters, vocab %d rows (tokenizer %d), seq_len %d", cfg.model.preset,
              count_parameters(model) / 1e6, rows, tok.vocab_size, seq_len)
    log_rank0("batch: micro batch %d x accumulation %d x world size %d = global batch %d sequences = %d tokens; "
              "ZeRO stage %d, %s", ds.micro_batch_size, ds.gradient_accumulation_steps, dist.world_size, global_batch,
              global_batch * seq_len, ds.zero_stage, ds.precision)
    log_rank0("data: %d train / %d val sequences (%.2f epochs planned)", len(train_reader), len(val_reader),
              cfg.max_steps * global_batch / len(train_reader))
    return engine, train_reader, val_reader, seq_len, global_batch


def evaluate(engine, reader: ShardReader, dist: DistInfo, cfg: TrainConfig) -> dict:
    """Mean validation loss (nats per predicted token) and perplexity over the fixed held-out set."""
    import torch

    engine.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(reader, dist.rank, dist.world_size, cfg.deepspeed.micro_batch_size, cfg.data.eval_batches):
            x = torch.from_numpy(batch).to(engine.device)
            n = x.shape[0] * (x.shape[1] - 1)
            loss_sum += engine(input_ids=x, labels=x).loss.float().item() * n
            tokens += n
    engine.train()
    loss_sum, tokens = all_reduce_sum([loss_sum, float(tokens)])
    loss = loss_sum / tokens if tokens else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(loss) if tokens else float("nan"), "val_tokens": int(tokens)}


def train_step(engine, batches, accumulation_steps: int, index_log=None, step: int = 0) -> float:
    """One optimizer step over ``accumulation_steps`` micro batches; returns this rank's mean loss."""
    import torch

    total = 0.0
    for _ in range(accumulation_steps):
        mb = next(batches)
        if index_log is not None:
            index_log.write(f"{step}\t{','.join(map(str, mb.sample_indices.tolist()))}\n")
        x = torch.from_numpy(mb.input_ids).to(engine.device)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        total += loss.float().item()
    return total / accumulation_steps


def save_checkpoint(engine, cfg: TrainConfig, state: TrainState) -> str:
    """Collective: every rank writes its ZeRO partition under ``run_dir/checkpoints/step_XXXXXXXX``."""
    tag = f"step_{state.step:08d}"
    engine.save_checkpoint(str(Path(cfg.run_dir) / CHECKPOINT_DIR), tag=tag,
                           client_state={"train_state": vars(state), "config_yaml": to_yaml(cfg)})
    return tag


def save_probe(engine, reader: ShardReader, cfg: TrainConfig, dist: DistInfo) -> None:
    """Collective forward of a fixed probe batch; rank 0 saves its ids and float32 logits for export verification."""
    import torch
    from safetensors.torch import save_file

    ids = torch.from_numpy(np.ascontiguousarray(reader.batch(np.arange(min(2, len(reader))))[:, :PROBE_TOKENS])).to(engine.device)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids).logits.float().cpu()
    engine.train()
    if dist.is_main:
        save_file({"input_ids": ids.cpu(), "logits": logits}, str(Path(cfg.run_dir) / PROBE_FILE),
                  metadata={"precision": cfg.deepspeed.precision})


def _train(cfg: TrainConfig, dist: DistInfo) -> dict:
    from tqdm.auto import tqdm

    engine, train_reader, val_reader, seq_len, global_batch = _setup(cfg, dist)
    run_dir = Path(cfg.run_dir)
    metrics = MetricsWriter(run_dir, dist.is_main)
    index_log = None
    if cfg.data.save_data_indices:
        (run_dir / "data-indices").mkdir(parents=True, exist_ok=True)
        index_log = open(run_dir / "data-indices" / f"rank{dist.rank}.tsv", "w", encoding="utf-8")
    state = TrainState()
    bar = tqdm(total=cfg.max_steps, desc="train", disable=not (dist.is_main and cfg.show_progress), dynamic_ncols=True)
    try:
        start_eval = evaluate(engine, val_reader, dist, cfg)
        metrics.write({"step": 0, **start_eval})
        log_rank0("validation at start: loss %.4f, perplexity %.2f", start_eval["val_loss"], start_eval["val_ppl"])
        batches = micro_batches(train_reader, dist.rank, dist.world_size, cfg.deepspeed.micro_batch_size, cfg.seed)
        t_start = t_log = time.perf_counter()
        loss_acc, steps_acc, tokens_log = 0.0, 0, 0
        last_eval = start_eval
        while state.step < cfg.max_steps:
            loss_acc += train_step(engine, batches, cfg.deepspeed.gradient_accumulation_steps, index_log, state.step)
            state.step += 1
            state.consumed_samples += global_batch
            state.tokens += global_batch * seq_len
            steps_acc += 1
            bar.update(1)
            if state.step % cfg.log_every_steps == 0 or state.step == cfg.max_steps:
                loss_sum, = all_reduce_sum([loss_acc / steps_acc])
                now = time.perf_counter()
                record = {"step": state.step, "loss": loss_sum / dist.world_size, "lr": engine.get_lr()[0],
                          "tokens_per_s": steps_acc * global_batch * seq_len / (now - t_log),
                          "consumed_samples": state.consumed_samples, "tokens": state.tokens}
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                loss_acc, steps_acc, t_log = 0.0, 0, now
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0 and state.step < cfg.max_steps:
                last_eval = evaluate(engine, val_reader, dist, cfg)
                metrics.write({"step": state.step, **last_eval})
            if cfg.save_every_steps and state.step % cfg.save_every_steps == 0 and state.step < cfg.max_steps:
                save_checkpoint(engine, cfg, state)
        bar.close()
        elapsed_s = time.perf_counter() - t_start
        end_eval = evaluate(engine, val_reader, dist, cfg)
        metrics.write({"step": state.step, **end_eval})
        log_rank0("validation at end: loss %.4f, perplexity %.2f (start %.2f)", end_eval["val_loss"], end_eval["val_ppl"], start_eval["val_ppl"])
        tag = save_checkpoint(engine, cfg, state)
        save_probe(engine, val_reader if len(val_reader) else train_reader, cfg, dist)
        summary = {"steps": state.step, "consumed_samples": state.consumed_samples, "tokens": state.tokens,
                   "elapsed_s": round(elapsed_s, 3), "tokens_per_s": state.tokens / elapsed_s,
                   "world_size": dist.world_size, "checkpoint_tag": tag,
                   "val_loss_start": start_eval["val_loss"], "val_ppl_start": start_eval["val_ppl"],
                   "val_loss_end": end_eval["val_loss"], "val_ppl_end": end_eval["val_ppl"]}
        if dist.is_main:
            write_json_atomic(run_dir / SUMMARY_FILE, summary)
        return summary
    finally:
        bar.close()
        metrics.close()
        if index_log is not None:
            index_log.close()


def read_summary(run_dir: str | Path) -> dict:
    """The ``summary.json`` of a finished run."""
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
