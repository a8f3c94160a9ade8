"""Memory plan: the bytes one training rank needs, and whether they fit, before any rank starts.

Per rank (bytes):

- model states (parameters, gradients, optimizer states): DeepSpeed's own estimators,
  ``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` at stages 0-2 (stage 0
  as one rank: nothing partitioned) and ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``
  at stage 3 (``zero_init=True``: lmforge builds the model partitioned). Each returns ``(cpu_mem,
  gpu_mem)``: ``gpu_mem`` is one device's share, ``cpu_mem`` the host memory of one node (model
  construction, and the offloaded states). They count 16-bit parameters and gradients; at fp32 precision
  the resident parameters and gradients take 2 more bytes each (lmforge's adjustment). The split into
  parameters / gradients / optimizer states follows DeepSpeed's comment on the estimator: 2 (16-bit params)
  + 18 = 2 (16-bit grads) + 4 (fp32 grads) + 4 (fp32 params) + 8 (Adam momentum and variance) bytes per parameter.
- activations of one micro batch (:func:`activation_bytes`).
- a fixed runtime footprint (:data:`FIXED_OVERHEAD_BYTES`): interpreter, torch, DeepSpeed, transformers, gloo.

On CPU every rank lives in host memory: a rank needs ``gpu_mem + cpu_mem / ranks per node`` plus
activations and the footprint, against the node's available memory (``MemAvailable`` of /proc/meminfo)
divided among its ranks. On GPU a rank needs ``gpu_mem`` plus activations and :data:`GPU_OVERHEAD_BYTES`
against its device's memory, and, in host memory, ``cpu_mem / ranks per node`` (model construction and, with
``offload_optimizer`` / ``offload_params``, the offloaded states) plus the host footprint
(:data:`FIXED_OVERHEAD_BYTES`) against the node's available memory divided among its ranks; it fits when both
do. Calibrated against measured peak RSS (bench/memory_plan.py, BENCHMARKS.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.config import TrainConfig
from pretrain.errors import ConfigError

FIXED_OVERHEAD_BYTES = 616_775_680
"""Peak RSS of one rank of a model too small to matter (llama-test, 0.36M parameters: under 10 MB of model
states and activations; fp32, ZeRO 3, 4 CPU ranks, micro batch 1, seq_len 256, 3 steps): the largest of the 4
ranks, measured with bench/memory_plan.py on the 2-core dev box (BENCHMARKS.md, "Memory plan"; the same launch
in bf16 peaked at 590,557,184)."""
GPU_OVERHEAD_BYTES = 2**30
"""Device memory outside the model on GPU (CUDA context, allocator caching): an estimate, not measured here."""
THIS_MACHINE = "this machine"
"""``available_bytes`` value: measure this machine's memory (:func:`available_per_rank`)."""
AVAILABLE_ENV = "LMFORGE_AVAILABLE_MEMORY_BYTES"
"""Environment variable: this node's memory available to training, bytes (overrides /proc/meminfo)."""
ADDITIONAL_BUFFER_FACTOR = 1.5
"""DeepSpeed's estimators' default margin on host memory."""


class MemoryPlanError(ConfigError):
    """The plan does not fit: the message is one line with needed, available and the knob that would fit;
    ``plan`` holds the figures."""

    def __init__(self, message: str, plan: MemoryPlan):
        super().__init__(message)
        self.plan = plan


@dataclass
class MemoryPlan:
    """Bytes per rank of one training configuration, and the memory available to a rank."""

    preset: str
    n_params: int
    """Parameters (elements), tied weights once."""
    largest_layer_params: int
    """Parameters of the largest module's own tensors (what ZeRO-3 gathers at once)."""
    zero_stage: int
    precision: str
    world_size: int
    ranks_per_node: int
    device: str
    """cpu or gpu."""
    estimator: str
    """The DeepSpeed function the model states come from."""
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    host_model_bytes: int
    """This rank's share of the estimator's host memory (``cpu_mem / ranks per node``): counted on CPU only."""
    activations_bytes: int
    overhead_bytes: int
    per_rank_bytes: int
    available_bytes: int | None
    """Memory one rank may use: node memory available / ranks per node (CPU), device memory (GPU); None = unknown."""
    fits: bool | None
    """Both checks pass (False: one fails; None: the device's memory is unknown)."""
    host_per_rank_bytes: int | None = None
    """GPU only: host memory one rank needs, ``cpu_mem / ranks per node`` plus the host footprint (None on CPU, where
    ``per_rank_bytes`` is host memory already)."""
    host_available_bytes: int | None = None
    """GPU only: host memory one rank may use (node memory available / ranks per node); None = unknown or CPU."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def activation_bytes(cfg: TrainConfig, model_config, seq_len: int, fused_loss: bool) -> int:
    """Activations kept for the backward pass of one micro batch, bytes.

    Per layer ``s b h (34 + 5 a s / h)`` bytes at 16 bits (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", eq. 2; doubled at fp32); with activation checkpointing only
    each layer's ``2 s b h``-byte input is kept, plus one layer recomputed. Plus the loss: the fused chunked loss
    (pretrain.loss) holds ``chunk x V`` float32 logits and the float32 gradients ``(b s, h)`` and ``(V, h)``;
    transformers' loss holds the ``(b, s, V)`` logits in the training dtype, their float32 copy and its gradient.
    """
    from pretrain.model import hidden_size, num_layers

    h, layers, s, b = hidden_size(model_config), num_layers(model_config), seq_len, cfg.deepspeed.micro_batch_size
    heads = getattr(model_config, "num_attention_heads", None) or model_config.n_head
    vocab = model_config.vocab_size
    scale = 2 if cfg.deepspeed.precision == "fp32" else 1
    layer = s * b * h * (34 + 5 * heads * s / h) * scale
    body = layers * 2 * s * b * h * scale + layer if cfg.deepspeed.activation_checkpointing else layers * layer
    if fused_loss:
        chunk = min(cfg.model.loss_chunk_tokens, b * s)
        loss = 4 * (chunk * vocab + b * s * h + vocab * h)
    else:
        loss = b * s * vocab * (2 * scale + 4 + 4)
    return int(body + loss)


def _model_shape(model_config) -> tuple[int, int]:
    """``(parameters, largest module's own parameters)`` counted on the meta device; cached per config, as
    :func:`fitting_knob` plans the same model several times."""
    from pretrain.model import meta_model

    key = model_config.to_json_string()
    if key not in _SHAPES:
        model = meta_model(model_config)
        _SHAPES[key] = (sum(p.numel() for p in model.parameters()),
                        max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()))
    return _SHAPES[key]


_SHAPES: dict[str, tuple[int, int]] = {}


def model_state_bytes(n: int, largest: int, stage: int, ranks_per_node: int, nodes: int, offload_optimizer: bool,
                      offload_params: bool) -> tuple[str, int, int]:
    """``(estimator name, cpu_mem per node, gpu_mem per rank)`` from DeepSpeed's estimators (bytes)."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            n, largest, num_gpus_per_node=ranks_per_node, num_nodes=nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=ADDITIONAL_BUFFER_FACTOR)
        return "deepspeed estimate_zero3_model_states_mem_needs", int(cpu), int(gpu)
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node, n_nodes = (ranks_per_node, nodes) if stage else (1, 1)  # stage 0: nothing is partitioned
    cpu, gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=per_node, num_nodes=n_nodes,
                                                     cpu_offload=offload_optimizer,
                                                     additional_buffer_factor=ADDITIONAL_BUFFER_FACTOR)
    cpu = cpu * ranks_per_node // per_node  # stage 0: every rank on the node builds the model
    return "deepspeed estimate_zero2_model_states_mem_needs" + (" (stage 0: as one rank)" if not stage else ""), \
        int(cpu), int(gpu)


def _split(gpu_mem: int, n: int, largest: int, cfg: TrainConfig, world_size: int,
           sub_group: int = 0) -> tuple[int, int, int]:
    """``gpu_mem`` split into (parameters, gradients, optimizer states) with DeepSpeed's per-parameter bytes.

    Stage 3 in fp32 without optimizer offload is lmforge's own count instead (:func:`_zero3_fp32`);
    ``sub_group``: its ``zero_optimization.sub_group_size``.
    """
    ds = cfg.deepspeed
    shards = 1 if ds.zero_stage == 0 else world_size
    if ds.zero_stage == 3 and ds.precision == "fp32" and not ds.offload_optimizer:
        return _zero3_fp32(gpu_mem, n, world_size, sub_group)
    if ds.offload_optimizer:
        params = gpu_mem
        grads = optimizer = 0
    else:
        optimizer = 12 * n // shards
        grads = (4 if ds.zero_stage == 3 else 6) * n // shards  # stage 3's 18: 2 params + 4 grads + 12 optimizer
        params = max(gpu_mem - optimizer - grads, 0)
    if ds.precision == "fp32":  # the estimators count 16-bit parameters and gradients
        resident = n // world_size if ds.zero_stage == 3 else n
        params += 2 * resident
        grads += 2 * (n // shards if ds.zero_stage >= 2 else n) * (not ds.offload_optimizer)
    return params, grads, optimizer


def _zero3_fp32(gpu_mem: int, n: int, world_size: int, sub_group: int) -> tuple[int, int, int]:
    """Stage 3, fp32, optimizer on the device: (parameters, gradients, optimizer states) per rank.

    The estimator's 18 bytes per parameter (2 16-bit params + 2 16-bit grads + 4 fp32 grads + 4 fp32 master + 8 Adam)
    do not describe lmforge's fp32 stage 3: the parameter partitions are the fp32 master weights
    (:func:`pretrain.engine.share_fp32_master_weights`), the gradient partition is fp32, and the fp32 gradient copy
    exists for one sub-group at a time during the step (``sub_group_size``, :func:`pretrain.engine.zero3_sizes`). So:
    parameters 4 n/R plus the estimator's term for the gathered layers (``gpu_mem`` less its 18 n/R), gradients
    4 n/R, optimizer states 8 n/R (Adam) plus 4 x ``sub_group``: 16 bytes per parameter, as the ZeRO paper
    counts, measured so (BENCHMARKS.md, "Memory plan": steady RSS rises by 16 n/R over construction and step 1).
    """
    shard = n // world_size
    gathered = max(gpu_mem - 18 * shard, 0)
    return 4 * shard + gathered, 4 * shard, 8 * shard + 4 * min(sub_group or shard, shard)


def plan_memory(cfg: TrainConfig, model_config, seq_len: int, world_size: int, ranks_per_node: int,
                device: str = "cpu", available_bytes: int | str | None = THIS_MACHINE,
                host_available_bytes: int | str | None = THIS_MACHINE) -> MemoryPlan:
    """The memory plan of ``cfg`` on ``world_size`` ranks, ``ranks_per_node`` of them per node.

    ``available_bytes``: memory one rank may use (device memory on GPU); :data:`THIS_MACHINE` = this machine's
    (:func:`available_per_rank`); None = unknown (``fits`` is then None). ``host_available_bytes``: on GPU, the
    host memory one rank may use, the same way (None = unknown: the host side is not checked); ignored on CPU.
    """
    from pretrain.loss import FUSED_LOSS_MODEL_TYPES

    ds = cfg.deepspeed
    n, largest = _model_shape(model_config)
    nodes = max(world_size // ranks_per_node, 1)
    estimator, cpu_mem, gpu_mem = model_state_bytes(n, largest, ds.zero_stage, ranks_per_node, nodes,
                                                    ds.offload_optimizer, ds.offload_params)
    sub_group = 0
    if ds.zero_stage == 3:
        from pretrain.engine import DEEPSPEED_SUB_GROUP_SIZE, build_ds_config

        zero = build_ds_config(cfg, world_size, model_config=model_config)["zero_optimization"]
        sub_group = int(zero.get("sub_group_size", DEEPSPEED_SUB_GROUP_SIZE))
        if ds.precision == "fp32" and not ds.offload_optimizer:
            estimator += " (fp32: lmforge's count of 16 bytes per parameter, see pretrain.plan._zero3_fp32)"
    params, grads, optimizer = _split(gpu_mem, n, largest, cfg, world_size, sub_group)
    host = cpu_mem // ranks_per_node if device == "cpu" else 0
    fused = bool(cfg.model.loss_chunk_tokens) and ds.zero_stage < 3 and model_config.model_type in FUSED_LOSS_MODEL_TYPES
    acts = activation_bytes(cfg, model_config, seq_len, fused)
    overhead = FIXED_OVERHEAD_BYTES if device == "cpu" else GPU_OVERHEAD_BYTES
    total = params + grads + optimizer + host + acts + overhead
    available = available_per_rank(device, ranks_per_node) if available_bytes == THIS_MACHINE else available_bytes
    host_need = host_available = None
    if device != "cpu":
        host_need = cpu_mem // ranks_per_node + FIXED_OVERHEAD_BYTES
        host_available = (available_per_rank("cpu", ranks_per_node) if host_available_bytes == THIS_MACHINE
                          else host_available_bytes)
    if isinstance(available, str) or isinstance(host_available, str):
        raise ValueError(f"available_bytes={available!r}, host_available_bytes={host_available!r}: a byte count, "
                         "None, or THIS_MACHINE")
    fits = None if available is None else total <= available
    if fits and host_need is not None and host_available is not None:
        fits = host_need <= host_available
    return MemoryPlan(preset=cfg.model.init_from or cfg.model.preset, n_params=n, largest_layer_params=largest,
                      zero_stage=ds.zero_stage, precision=ds.precision, world_size=world_size,
                      ranks_per_node=ranks_per_node, device=device, estimator=estimator, params_bytes=params,
                      grads_bytes=grads, optimizer_bytes=optimizer, host_model_bytes=host, activations_bytes=acts,
                      overhead_bytes=overhead, per_rank_bytes=total, available_bytes=available, fits=fits,
                      host_per_rank_bytes=host_need, host_available_bytes=host_available)


def available_per_rank(device: str, ranks_per_node: int) -> int | None:
    """Bytes one rank may use on this machine: the node's available memory / ranks per node (CPU), device 0's
    memory (GPU; None without one).

    The node's available memory: ``$LMFORGE_AVAILABLE_MEMORY_BYTES`` when set (a container or a machine shared
    with others), else ``MemAvailable`` of /proc/meminfo, capped by the cgroup v2 limit (``memory.max`` less
    ``memory.current``) when there is one.
    """
    import os

    if device == "gpu":
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    if os.environ.get(AVAILABLE_ENV):
        return int(os.environ[AVAILABLE_ENV]) // ranks_per_node
    from pathlib import Path

    meminfo = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
    node = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="ascii").strip()
        if limit != "max":
            node = min(node, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text(encoding="ascii")))
    except OSError:  # no cgroup v2 memory controller here
        pass
    return node // ranks_per_node


KNOBS = (("deepspeed.zero_stage=3", {"zero_stage": 3}),
         ("deepspeed.activation_checkpointing=true", {"activation_checkpointing": True}),
         ("deepspeed.offload_optimizer=true", {"offload_optimizer": True}),
         ("deepspeed.zero_stage=3 deepspeed.offload_optimizer=true deepspeed.offload_params=true",
          {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}))
"""Single changes tried, in order, when a plan does not fit (what each saves: module docstring)."""


def fitting_knob(cfg: TrainConfig, model_config, seq_len: int, world_size: int, ranks_per_node: int,
                 device: str, available_bytes: int, host_available_bytes: int | None = None) -> str | None:
    """The first single change of :data:`KNOBS`, or a micro batch of 1 with more accumulation (same global
    batch), whose plan fits; None when none does."""
    ds = cfg.deepspeed
    candidates = [(text, change) for text, change in KNOBS if any(getattr(ds, k) != v for k, v in change.items())
                  and not (change == {"offload_optimizer": True} and ds.zero_stage == 0)]
    if ds.micro_batch_size > 1:
        accumulation = ds.micro_batch_size * ds.gradient_accumulation_steps
        candidates.append((f"deepspeed.micro_batch_size=1 deepspeed.gradient_accumulation_steps={accumulation}",
                           {"micro_batch_size": 1, "gradient_accumulation_steps": accumulation}))
    for text, change in candidates:
        trial = dataclasses.replace(cfg, deepspeed=dataclasses.replace(ds, **change))
        if plan_memory(trial, model_config, seq_len, world_size, ranks_per_node, device, available_bytes,
                       host_available_bytes).fits:
            return text
    return None


def check_memory(cfg: TrainConfig, world_size: int, ranks_per_node: int, device: str | None = None,
                 available_bytes: int | str | None = THIS_MACHINE,
                 host_available_bytes: int | str | None = THIS_MACHINE) -> MemoryPlan:
    """The plan of ``cfg`` (model config from :func:`pretrain.trainer.preflight`: tokenizer and data are read).

    ``device``: cpu or gpu (default: gpu when torch sees one). ``available_bytes``, ``host_available_bytes``: per
    rank (see :func:`plan_memory`).

    Raises:
        MemoryPlanError: it does not fit (:func:`refusal_line`); the preflight's errors as they come.
    """
    from pretrain.trainer import preflight

    if device is None:
        import torch

        device = "gpu" if torch.cuda.is_available() else "cpu"
    _, model_config, seq_len = preflight(cfg)
    plan = plan_memory(cfg, model_config, seq_len, world_size, ranks_per_node, device, available_bytes,
                       host_available_bytes)
    if plan.fits is False and plan.available_bytes is not None:
        knob = fitting_knob(cfg, model_config, seq_len, world_size, ranks_per_node, device, plan.available_bytes,
                            plan.host_available_bytes)
        raise MemoryPlanError(refusal_line(plan, knob), plan)
    return plan


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def refusal_line(plan: MemoryPlan, knob: str | None) -> str:
    """One line: needed, available, and what would fit."""
    where = f"{plan.ranks_per_node} rank(s) per node" if plan.device == "cpu" else "per device"
    fix = f"{knob} would fit" if knob else "no single knob fits: use more ranks or nodes, or a smaller model"
    need = (f"{_gib(plan.per_rank_bytes)} per rank, {_gib(plan.available_bytes or 0)} available per rank "
            f"({where}, {plan.device})")
    if _host_short(plan):
        need = (f"{_gib(plan.host_per_rank_bytes or 0)} of host memory per rank (model construction and offloaded "
                f"states), {_gib(plan.host_available_bytes or 0)} available per rank ({plan.ranks_per_node} rank(s) "
                f"per node; device: {_gib(plan.per_rank_bytes)} of {_gib(plan.available_bytes or 0)})")
    return (f"memory plan: {plan.preset} at ZeRO stage {plan.zero_stage} on {plan.world_size} rank(s) needs "
            f"{need}; {fix} (lmforge plan CONFIG for the breakdown; --force starts anyway)")


def _host_short(plan: MemoryPlan) -> bool:
    """A GPU plan whose device side fits but whose host side does not."""
    return (plan.host_per_rank_bytes is not None and plan.host_available_bytes is not None
            and plan.available_bytes is not None and plan.per_rank_bytes <= plan.available_bytes
            and plan.host_per_rank_bytes > plan.host_available_bytes)


def render(plan: MemoryPlan) -> str:
    """The plan as a small table, one component a line."""
    rows = [("parameters", plan.params_bytes), ("gradients", plan.grads_bytes),
            ("optimizer states", plan.optimizer_bytes), ("model construction, host", plan.host_model_bytes),
            ("activations", plan.activations_bytes), ("fixed overhead", plan.overhead_bytes),
            ("per rank", plan.per_rank_bytes)]
    head = (f"memory plan: {plan.preset}, {plan.n_params / 1e6:.1f}M parameters, ZeRO stage {plan.zero_stage}, "
            f"{plan.precision}, {plan.world_size} rank(s), {plan.ranks_per_node} per node, {plan.device}\n"
            f"model states: {plan.estimator}\n")
    body = "".join(f"  {name:<26}{_gib(value):>12}\n" for name, value in rows)
    if plan.host_per_rank_bytes is not None:
        host = ("unknown" if plan.host_available_bytes is None else f"{_gib(plan.host_available_bytes)} available")
        body += f"  {'host memory per rank':<26}{_gib(plan.host_per_rank_bytes):>12}  ({host})\n"
    verdict = ("unknown (no device memory to compare with)" if plan.fits is None else
               f"{'fits' if plan.fits else 'does NOT fit'}: {_gib(plan.available_bytes or 0)} available per rank"
               + (" (host memory short)" if _host_short(plan) else ""))
    return head + body + f"  {verdict}\n"
