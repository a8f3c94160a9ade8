"""The peers of the train benchmarks, one rank each, started on :data:`NPROC` ranks by ``launch.local.run_local``.

Every worker reads the very training config the lmforge side trains (a YAML written by the parent with
``pretrain.config.to_yaml``), builds the model with ``pretrain.model.build_model`` (same preset, seed and
weights, ``attn_implementation`` ``cfg.model.attention``) and trains ``cfg.max_steps`` optimizer steps on the
prepared shards of ``cfg.data.path``. Rank 0 writes ``{"tokens_per_s", "steps", "engine"}`` to ``--result``;
tokens/s (all ranks together) is steady state: the step-end times after the first :data:`SKIP_STEPS` steps.

Workers:

- ``trainer --loss own``: ``transformers.Trainer(model, TrainingArguments(deepspeed=<lmforge's generated
  ds_config dict>, optim="adamw_torch_fused", bf16=..., ...), data_collator=common.collate_rows)``: the model's own
  loss (transformers' ``ForCausalLMLoss`` on full float32 logits), the Trainer's ``compute_loss`` unchanged.
- ``trainer --loss fused``: the same, with lmforge's public ``pretrain.loss.enable_fused_loss(model,
  cfg.model.loss_chunk_tokens)`` applied before the Trainer wraps the model (the call lmforge's trainer
  makes, ``pretrain.trainer._use_fused_loss``), and :class:`MeanLossTrainer`, whose ``compute_loss`` takes
  ``outputs.loss`` as it is (the rank's mean over its tokens, as lmforge's step does) instead of rescaling
  it by ``num_items_in_batch`` and the world size.
- ``trainer-mlm``: the ``run_mlm.py`` recipe: ``Trainer`` + ``DataCollatorForLanguageModeling(tokenizer,
  mlm_probability=cfg.mlm.probability, mask_replace_prob, random_replace_prob)`` on the prepared sequences'
  ``input_ids`` (already packed to seq_len; no document masking, as lmforge's side runs with
  ``data.document_masking=false``).
- ``ddp``: the floor, bare torch: ``torch.distributed`` (gloo), ``DistributedDataParallel`` (default buckets:
  25 MB, no static graph), ``torch.optim.AdamW(fused=True)`` with lmforge's two groups (weight decay on
  matrices only) and hyper-parameters, a ``LambdaLR`` warmup + cosine, ``clip_grad_norm_(cfg.optim.grad_clip)``,
  the model's own loss; in bf16 runs the forward under ``torch.autocast("cpu", torch.bfloat16)`` with float32
  weights, gradients (all-reduced in float32) and optimizer states (DeepSpeed's bf16 instead keeps bf16 weights
  and gradients and float32 master weights in the ZeRO optimizer). Each rank reads its own slice of the
  shards in order, collated by ``common.collate_rows``.

``trainer`` runs on a CUDA GPU when one is visible (``bench/gpu_mfu.py``: one rank, ``DS_ACCELERATOR=cuda``), else on
the CPU (the CPU benches hide GPUs with ``common.CPU_ONLY_ENV``). It follows the config's ``compile``
(``TrainingArguments(torch_compile=True)``: accelerate then calls DeepSpeed's ``engine.compile()``, as lmforge does) and
``deepspeed.activation_checkpointing`` (``gradient_checkpointing=True``, non-reentrant, as lmforge's
``model.gradient_checkpointing_enable``); ``--liger`` adds ``use_liger_kernel=True`` (Liger-Kernel's Triton RMSNorm,
RoPE, SwiGLU and fused linear cross-entropy patched into the model by the Trainer; CUDA only, the model's own loss).

The causal peers set ``model.config.use_cache = False``, as lmforge passes ``use_cache=False``: with a KV cache
transformers ignores the document-masking ``position_ids`` and runs plain causal attention (less work).

Usage (by ``bench_train.py`` / ``bench_train_mlm.py`` / ``gpu_mfu.py``): ``python bench/train_peers.py
{trainer,trainer-mlm,ddp} --config CFG.yaml --result OUT.json [--loss own|fused] [--liger] [--skip-steps N]`` on each
rank, or :func:`run_peer` from the parent.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import common

NPROC = 2
SKIP_STEPS = 4
"""Warm-up steps left out of tokens/s on every side."""
MALLOC_NOTE = ("lmforge below ZeRO 3 keeps glibc's default mmap threshold (deepspeed.return_freed_memory=auto); "
               "when its ranks set 1 MiB at every stage (before 2026-12-03), each activation of 1 MiB or more was mapped "
               "and faulted in again every step and lmforge ran at 0.44x (fused) and 0.71x (own loss) the Trainer here")
"""What changed lmforge's CPU figures on 2026-12-03 (the first run of this bench found it)."""


def load(config_file: Path):
    """``(cfg, model_config, seq_len, model)`` of the config the lmforge side trains."""
    from pretrain.config import load_config
    from pretrain.model import build_model
    from pretrain.trainer import preflight

    cfg = load_config(config_file)
    _, model_config, seq_len = preflight(cfg)
    model = build_model(model_config, cfg.seed, attention=cfg.model.attention)
    return cfg, model_config, seq_len, model


def train_dataset(cfg, columns: list[str] | None = None):
    """The prepared train shards as one ``datasets.Dataset`` (only ``columns`` when given)."""
    import datasets

    train = datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in common.shard_paths(Path(cfg.data.path))])
    return train.select_columns(columns) if columns else train


def steady_result(ends: list[float], tokens_per_step: int, engine: str, skip_steps: int = SKIP_STEPS) -> dict:
    """tokens/s over the steps after ``skip_steps`` (at least 1) from the step-end times ``ends`` (seconds)."""
    skip = max(1, skip_steps)
    steady = len(ends) - skip
    if steady < 1:
        raise RuntimeError(f"{len(ends)} steps: need more than {skip}")
    return {"tokens_per_s": steady * tokens_per_step / (ends[-1] - ends[skip - 1]), "steps": len(ends),
            "skip_steps": skip, "engine": engine}


def training_arguments(cfg, world_size: int, output_dir: str, liger: bool = False):
    """``TrainingArguments`` equal to the lmforge config: batch, precision, ds_config, fused AdamW, schedule, compile,
    activation checkpointing; on the GPU when one is visible, and with ``use_liger_kernel`` when ``liger``."""
    import torch
    from transformers import TrainingArguments

    from pretrain.engine import SCHEDULER_NAMES, build_ds_config

    opt, ds = cfg.optim, cfg.deepspeed
    schedule_kwargs = {"cosine": {"min_lr_rate": opt.min_lr_ratio},  # as pretrain.engine.build_scheduler
                       "wsd": {"num_decay_steps": max(1, round(opt.decay_fraction * cfg.max_steps)),
                               "min_lr_ratio": opt.min_lr_ratio, "decay_type": "cosine"}}.get(opt.schedule, {})
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=ds.micro_batch_size,
        gradient_accumulation_steps=ds.gradient_accumulation_steps, max_steps=cfg.max_steps,
        bf16=ds.precision == "bf16", fp16=ds.precision == "fp16", deepspeed=build_ds_config(cfg, world_size),
        optim="adamw_torch_fused", learning_rate=opt.lr, weight_decay=opt.weight_decay, adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1], adam_epsilon=opt.eps, max_grad_norm=opt.grad_clip, warmup_steps=opt.warmup_steps,
        lr_scheduler_type=SCHEDULER_NAMES[opt.schedule], lr_scheduler_kwargs=schedule_kwargs,
        logging_steps=10**9, save_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False,
        seed=cfg.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True, torch_compile=cfg.compile,
        gradient_checkpointing=ds.activation_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=liger)


def trainer_worker(config_file: Path, loss: str, mlm: bool, result_path: Path, liger: bool = False,
                   skip_steps: int = SKIP_STEPS) -> int:
    """One rank of a Trainer side (causal with ``loss`` own or fused, or the masked-LM recipe); ``liger``: with
    ``use_liger_kernel`` (own loss only: Liger brings its fused linear cross-entropy)."""
    from functools import partial

    from transformers import Trainer, TrainerCallback

    from pretrain.flops import peak_memory_gib

    if liger and loss != "own":
        raise ValueError("--liger brings Liger's own fused loss: use it with --loss own")
    cfg, _, seq_len, model = load(config_file)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    trainer_cls = Trainer
    collator: Callable[[list[dict]], dict]
    if mlm:
        from transformers import AutoTokenizer, DataCollatorForLanguageModeling

        m = cfg.mlm
        collator = DataCollatorForLanguageModeling(AutoTokenizer.from_pretrained(cfg.data.tokenizer), mlm_probability=m.probability,
                                                   mask_replace_prob=m.mask_replace_prob, random_replace_prob=m.random_replace_prob)
        train = train_dataset(cfg, ["input_ids"])
    else:
        model.config.use_cache = False
        collator = partial(common.collate_rows, document_masking=cfg.data.document_masking)
        train = train_dataset(cfg)
        if loss == "fused":
            from pretrain.loss import enable_fused_loss

            enable_fused_loss(model, cfg.model.loss_chunk_tokens)
            trainer_cls = MeanLossTrainer()

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out:
        trainer = trainer_cls(model=model, args=training_arguments(cfg, world_size, out, liger), train_dataset=train,
                              data_collator=collator, callbacks=[StepTimes()])
        liger_modules = sum("Liger" in m._get_name() for m in model.modules())  # Liger patches (and renames) in place
        trainer.train()
        engine = type(trainer.model_wrapped).__name__
        dtype = str(next(trainer.model_wrapped.parameters()).dtype)
    if int(os.environ.get("RANK", "0")) == 0:
        ds = cfg.deepspeed
        tokens_per_step = ds.micro_batch_size * ds.gradient_accumulation_steps * world_size * seq_len
        result_path.write_text(json.dumps({**steady_result(ends, tokens_per_step, engine, skip_steps), "param_dtype": dtype,
                                           "liger_modules": liger_modules, "peak_mem_gib": peak_memory_gib()}))
    return 0


def MeanLossTrainer():  # noqa: N802 (a class, built on first use: transformers is imported lazily)
    """``Trainer`` whose ``compute_loss`` returns the model's ``outputs.loss`` unchanged (no loss kwargs)."""
    from transformers import Trainer

    class _MeanLossTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # no num_items_in_batch: the fused loss is already a mean

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return _MeanLossTrainer


def lr_lambda(cfg):
    """Linear warmup, then cosine down to ``min_lr_ratio`` (lmforge's ``cosine`` schedule), as a LambdaLR factor."""
    opt = cfg.optim

    def factor(step: int) -> float:
        if step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        progress = min(1.0, (step - opt.warmup_steps) / max(1, cfg.max_steps - opt.warmup_steps))
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def ddp_worker(config_file: Path, result_path: Path) -> int:
    """One rank of the bare-torch floor: gloo DDP, fused AdamW, autocast bf16 when lmforge runs bf16."""
    import contextlib

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cfg, _, seq_len, model = load(config_file)
    model.config.use_cache = False
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ddp = DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = cfg.optim
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": opt.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    micro = cfg.deepspeed.micro_batch_size
    train = train_dataset(cfg)
    bf16 = cfg.deepspeed.precision == "bf16"
    ends: list[float] = []
    model.train()
    for step in range(cfg.max_steps):
        first = (step * world + rank) * micro
        batch = common.collate_rows([train[i] for i in range(first, first + micro)], cfg.data.document_masking)
        autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = ddp(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    dist.barrier()
    if rank == 0:
        result_path.write_text(json.dumps(steady_result(ends, micro * world * seq_len, "DistributedDataParallel")))
    dist.destroy_process_group()
    return 0


def run_peer(kind: str, config_file: Path, tmp: Path, loss: str = "own", nproc: int = NPROC,
             env: dict[str, str] | None = None, liger: bool = False, skip_steps: int = SKIP_STEPS) -> dict:
    """Run worker ``kind`` (``trainer``, ``trainer-mlm`` or ``ddp``) on ``nproc`` ranks with ``run_local``, in ``env``
    (default :data:`common.CPU_ONLY_ENV`); its result, ``wall_s`` and ``peak_rss_bytes``. ``liger`` and ``skip_steps``:
    see :func:`trainer_worker` and :func:`steady_result`.

    Raises:
        RuntimeError: a rank failed (the output's tail in the message), a Trainer side did not train through
            DeepSpeed, or Liger was asked for and patched nothing.
    """
    result_path = tmp / f"{kind}-{loss}-{time.monotonic_ns()}.json"
    worker = [sys.executable, str(Path(__file__).resolve()), kind, "--config", str(config_file), "--result", str(result_path),
              "--loss", loss, "--skip-steps", str(skip_steps), *(["--liger"] if liger else [])]
    launcher = f"import sys; from launch.local import run_local; run_local(sys.argv[1:], {nproc})"
    res = common.run_child([sys.executable, "-c", launcher, *worker],
                           env=common.python_env(**(common.CPU_ONLY_ENV if env is None else env)))
    common.check_child(res, f"the {kind} side ({loss} loss{', Liger' if liger else ''})")
    out = json.loads(result_path.read_text())
    if kind.startswith("trainer") and out["engine"] != "DeepSpeedEngine":
        raise RuntimeError(f"the Trainer did not train through DeepSpeed (model wrapped in {out['engine']})")
    if liger and not out.get("liger_modules"):
        raise RuntimeError("use_liger_kernel=True patched no module of the model")
    return {**out, "wall_s": round(res.wall_s, 2), "peak_rss_bytes": res.peak_rss_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["trainer", "trainer-mlm", "ddp"])
    parser.add_argument("--config", type=Path, required=True, help="the lmforge training config YAML to match")
    parser.add_argument("--result", type=Path, required=True, help="JSON written by rank 0")
    parser.add_argument("--loss", choices=["own", "fused"], default="own", help="trainer: the model's own loss or lmforge's")
    parser.add_argument("--liger", action="store_true", help="trainer: TrainingArguments(use_liger_kernel=True)")
    parser.add_argument("--skip-steps", type=int, default=SKIP_STEPS, help="trainer: warm-up steps left out of tokens/s")
    args = parser.parse_args(argv)
    common.use_this_checkout()
    if args.kind == "ddp":
        return ddp_worker(args.config, args.result)
    return trainer_worker(args.config, args.loss, args.kind == "trainer-mlm", args.result, args.liger, args.skip_steps)


if __name__ == "__main__":
    sys.exit(main())
