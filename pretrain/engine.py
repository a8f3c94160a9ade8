"""The DeepSpeed engine: ds_config generated from the lmforge config, and the one ``deepspeed.initialize`` call."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pretrain.config import TrainConfig
from pretrain.errors import ConfigError

SCHEDULER_NAMES = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup",
                   "wsd": "warmup_stable_decay"}
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16")
"""ds_config keys generated from the lmforge config that a user file may repeat but not change."""
"""lmforge schedule -> ``transformers.get_scheduler`` name (all with linear warmup)."""


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number of the mmap threshold (malloc.h)."""
MMAP_THRESHOLD_BYTES = 2**20
"""Allocations from this size up are mmapped, and unmapped when freed (lmforge's choice: every parameter
matrix, gradient bucket and gathered ZeRO-3 parameter of the presets from llama-125m up is larger)."""


def return_large_frees_to_os() -> bool:
    """Make glibc mmap every allocation of :data:`MMAP_THRESHOLD_BYTES` or more, so that freeing it returns it.

    By default glibc raises its mmap threshold after the first large free, up to 32 MiB (mallopt(3), "dynamic
    mmap threshold"); tensors of a few MiB then come from the heap, whose holes never go back to the OS. On CPU
    ranks the parameters ZeRO-3 gathers and frees, layer after layer, thus kept each rank's resident set
    several GB above its live tensors (issue 14). Setting the threshold fixes it and turns that adjustment
    off, as ``MALLOC_MMAP_THRESHOLD_`` in the environment would. Returns False (nothing done) off glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def returns_freed_memory(choice: str, zero_stage: int) -> bool:
    """Whether a rank calls :func:`return_large_frees_to_os` for ``deepspeed.return_freed_memory`` = ``choice``
    (auto / always / never) at ``zero_stage``: auto means ZeRO 3 only, where parameters are gathered and freed
    every layer. Below ZeRO 3 the threshold only costs: every CPU activation is then mapped and faulted in again
    each step (llama-tiny at ZeRO 2 on 2 ranks trained at about 4,000-4,300 tokens/s with it, 5,700-6,100 without;
    ``bench/bench_train.py``)."""
    return choice == "always" or (choice == "auto" and zero_stage == 3)


def build_ds_config(cfg: TrainConfig, world_size: int, load_universal: bool = False, model_config=None) -> dict:
    """The DeepSpeed config for ``cfg`` on ``world_size`` data-parallel ranks.

    ``load_universal``: the engine will load a universal checkpoint (resume at another world size).
    ``model_config``: the transformers config; at ZeRO stage 3 it sizes the buckets (:func:`zero3_sizes`).
    A user's ``deepspeed.config_file`` is merged last and wins over every generated key but the owned ones.

    ``train_batch_size`` (the global batch, in sequences) = micro batch x accumulation x world size.
    """
    ds = cfg.deepspeed
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": ds.micro_batch_size * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if ds.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        config["zero_force_ds_cpu_optimizer"] = False  # lmforge's AdamW param groups run on the CPU as given
    if ds.zero_stage == 3 and model_config is not None:
        config["zero_optimization"].update(zero3_sizes(model_config))
    if ds.offload_params:
        config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.config_file:
        config = merge_user_ds_config(config, ds.config_file)
    return config


def zero3_sizes(model_config) -> dict:
    """Stage-3 buckets and thresholds (in parameters, i.e. elements) sized from the model's hidden size ``h``.

    DeepSpeed's defaults (``reduce_bucket_size`` and ``stage3_prefetch_bucket_size`` 5e8, both
    ``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` 1e9) exceed a 1B model, so every
    gathered parameter may stay resident and stage 3 saved no memory (issue 14). Sources:

    - ``reduce_bucket_size = h*h``, ``stage3_prefetch_bucket_size = 0.9*h*h`` and
      ``stage3_param_persistence_threshold = 10*h``: the Hugging Face Trainer's ``"auto"`` values
      (``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig.trainer_config_finalize``).
    - ``stage3_max_live_parameters = stage3_max_reuse_distance`` = the prefetch bucket, ``0.9*h*h``: lmforge's
      choice, measured. DeepSpeed's docs say smaller values use less memory and communicate more. At two
      transformer layers (the first choice) llama-350m's ZeRO-3 peak (fp32, 4 CPU ranks) rose by 0.11 GiB
      per rank from the third step on, once DeepSpeed had traced the module order and prefetched up to the
      limit: 2.40 against 2.29 GiB at the prefetch bucket, which keeps it within the ZeRO paper's bound
      (issue 14, BENCHMARKS.md). Raise both in ``deepspeed.config_file`` when device memory is plentiful
      and the all-gathers are the bottleneck.
    - ``sub_group_size`` = one transformer layer's parameters, at least ``h*h``, at most DeepSpeed's default 1e9:
      lmforge's choice. Stage 3 runs the optimizer one sub-group of this rank's partition at a time and first
      copies the sub-group's gradients into a new flat fp32 tensor (``_prepare_fp32_grad_for_sub_group``), 4 bytes
      per element; at the default the whole partition is one sub-group, so that copy was a whole extra partition
      during every optimizer step. With :func:`build_optimizer`'s fused AdamW, the step's transient on top of the
      resident states fell from 0.87 GiB to 0.05 GiB per rank (llama-350m, fp32, 4 CPU ranks; VmHWM reset and read
      around ``optimizer.step``).
      One layer keeps it to a few hundred MB at 70B while each sub-group's step stays a large vectorised call.
      The sub-groups are the optimizer states' layout in a checkpoint: a run started with another value resumes
      through a universal checkpoint (a world-size change does that already) or with the old value in
      ``deepspeed.config_file``.
    """
    from pretrain.model import count_parameters, hidden_size, num_layers

    h = hidden_size(model_config)
    embeddings = model_config.vocab_size * h * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    per_layer = max(count_parameters(model_config) - embeddings, 0) // num_layers(model_config)
    live = int(0.9 * h * h)
    return {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h, "stage3_max_live_parameters": live,
            "stage3_max_reuse_distance": live, "sub_group_size": min(max(per_layer, h * h), DEEPSPEED_SUB_GROUP_SIZE)}


DEEPSPEED_SUB_GROUP_SIZE = 10**9
"""DeepSpeed's default ``zero_optimization.sub_group_size`` (elements), the cap of lmforge's (:func:`zero3_sizes`)."""


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def merge_user_ds_config(generated: dict, path: str) -> dict:
    """``generated`` with the user's ds_config.json merged over it (user keys win, nested dicts merged).

    Raises:
        ConfigError: unreadable file, or a value for a key lmforge owns (:data:`OWNED_KEYS`) that
            differs from the generated one.
    """
    file = Path(path)
    try:
        user = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read DeepSpeed config ({exc})") from exc
    conflicts = [f"{k}={user[k]!r} (lmforge: {generated.get(k)!r})" for k in OWNED_KEYS
                 if k in user and user[k] != generated.get(k)]
    if conflicts:
        raise ConfigError(f"{path}: sets keys lmforge derives from its own config: {'; '.join(conflicts)}; "
                          "change deepspeed.* / optim.* in the lmforge config instead")
    return _deep_merge(generated, user)


def optimizer_group(ndim: int) -> int:
    """AdamW param group of a parameter with ``ndim`` dimensions: 0 (weight decay) for matrices, 1 (none)
    for norms and biases. The export maps a stage-0 checkpoint's per-group fp32 master weights back to
    names with this rule (pretrain.export.consolidate)."""
    return 0 if ndim >= 2 else 1


def build_optimizer(model, cfg: TrainConfig):
    """AdamW with weight decay on matrices only: norms, biases (all 1-D tensors) get none (GPT-3, nanoGPT).

    torch's fused AdamW (``fused=True``; CPU and CUDA kernels, one pass per tensor, no temporaries). The default on
    CPU is the single-tensor loop, whose ``exp_avg_sq.sqrt() / bias_correction2_sqrt`` makes two temporaries the
    size of the tensor; under ZeRO a tensor is a rank's whole flat partition (stage 1-2) or sub-group (stage 3),
    so each optimizer step held two more copies of it (issue 14, with the flat gradient copy of
    :func:`zero3_sizes`: the 0.87 GiB transient of llama-350m's ZeRO-3 step on 4 CPU ranks). The loop's update
    within fp32 rounding (the kernel orders its operations differently); a resume stays bit-exact, as every step
    of a run uses the same kernel.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    ndims = [len(getattr(p, "ds_shape", p.shape)) for p in params]  # ZeRO-3 built partitioned: p is 1-D and empty
    groups = [
        {"params": [p for p, n in zip(params, ndims) if optimizer_group(n) == 0], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p, n in zip(params, ndims) if optimizer_group(n) == 1], "weight_decay": 0.0},
    ]
    beta1, beta2 = cfg.optim.betas  # validated: two values
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(beta1, beta2), eps=cfg.optim.eps, fused=True)


def build_scheduler(optimizer, cfg: TrainConfig):
    """Linear warmup over ``optim.warmup_steps`` then ``optim.schedule`` until ``max_steps`` (transformers schedulers)."""
    from transformers import get_scheduler

    opt = cfg.optim
    per_schedule: dict[str, dict[str, Any]] = {
        "cosine": {"min_lr_rate": opt.min_lr_ratio},
        "wsd": {"num_decay_steps": max(1, round(opt.decay_fraction * cfg.max_steps)), "min_lr_ratio": opt.min_lr_ratio,
                "decay_type": "cosine"}}
    kwargs = per_schedule.get(opt.schedule, {})
    return get_scheduler(SCHEDULER_NAMES[cfg.optim.schedule], optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                         num_training_steps=cfg.max_steps, scheduler_specific_kwargs=kwargs)


def share_fp32_master_weights() -> bool:
    """Let DeepSpeed's stage 3 use the fp32 parameter partitions as its fp32 master weights, as it means to.

    ``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`` skips the separate fp32 copy when a sub-group's
    partition already has the master dtype and sits on ``self.device`` ("we don't need another copy of the
    weights"), but ``self.device`` is the accelerator's device *name*, a str ('cpu', 'cuda:0'), and a
    ``torch.device`` never equals a str, so the test always fails and fp32 training kept every rank's partition
    twice: 4 more bytes per partitioned parameter (llama-350m, 4 CPU ranks: +0.31 GB per rank, measured; issue 14).
    The wrapper makes ``self.device`` a ``torch.device`` for that call only. The master weights then alias the
    parameter partitions, which DeepSpeed's step already allows for (its copy back is then a no-op), so the
    numbers are those of the copy. Patched once per process; returns False when this DeepSpeed has no such method.
    """
    import torch
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    original = getattr(DeepSpeedZeroOptimizer_Stage3, "_create_fp32_partitions", None)
    if original is None:
        return False
    if getattr(original, "lmforge_shares_fp32", False):
        return True

    def create_fp32_partitions(self):
        name = self.device
        if isinstance(name, str) and not self.offload_optimizer:
            self.device = torch.device(name)
        try:
            return original(self)
        finally:
            self.device = name

    create_fp32_partitions.lmforge_shares_fp32 = True  # type: ignore[attr-defined]
    DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = create_fp32_partitions
    return True


def initialize_engine(model, cfg: TrainConfig, world_size: int, load_universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine with the generated config, optimizer and schedule.

    ``cfg.compile``: the engine's module is compiled (DeepSpeed's ``engine.compile()``: ``torch.compile`` with the
    accelerator's backend, inductor on CPU and CUDA); :func:`pretrain.step.train_step` logs the first step's time.
    """
    import deepspeed
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    # Declares the checkpoint convertible to DeepSpeed's universal format (no tensor-parallel
    # patterns: lmforge is data parallel), so a resume can change the world size.
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    if cfg.deepspeed.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    share_fp32_master_weights()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_ds_config(cfg, world_size, load_universal, model.config))
    if cfg.compile:  # lazy: torch.compile traces and generates code in the first forward / backward
        engine.compile()
    return engine
