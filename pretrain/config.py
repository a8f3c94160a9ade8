"""Typed training config: a YAML file plus dotted CLI overrides (``optim.lr=1e-3``), via OmegaConf.

Every field states its unit. :func:`load_config` merges defaults < YAML < overrides, type-checks
(parsed by OmegaConf), type-checks the result with pydantic against these dataclasses (``Literal``
fields list their allowed values; unknown keys are refused), then :meth:`TrainConfig.validate`
checks the values that depend on each other. Every problem of all three steps is reported in one
:class:`~pretrain.errors.ConfigError`. The DeepSpeed config is generated from this
(``pretrain.engine.build_ds_config``): one source of truth.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Sequence, get_args

from pretrain.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
"""Training dtype names."""
ZeroStage = Literal[0, 1, 2, 3]
"""ZeRO stages (Rajbhandari et al. 2020): 0 = plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters."""
Schedule = Literal["cosine", "linear", "constant", "wsd"]
"""Learning-rate schedules after warmup."""
Attention = Literal["sdpa", "flash_attention_2", "flex_attention", "eager"]
"""Attention kernels: transformers' ``attn_implementation`` values."""
PRECISIONS: tuple[str, ...] = get_args(Precision)
ZERO_STAGES: tuple[int, ...] = get_args(ZeroStage)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
STRICT = {"extra": "forbid", "coerce_numbers_to_str": True}
"""pydantic settings of every config dataclass: unknown keys are errors; ``run_dir=123`` is the string "123"."""


@dataclass
class ModelConfig:
    preset: str = "llama-tiny"
    """Architecture preset, a key of ``pretrain.model.PRESETS``."""
    vocab_size: int = 0
    """Embedding rows (tokens); 0 = the tokenizer's size rounded up to a multiple of 64."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Any transformers config field, e.g. ``{num_hidden_layers: 2}``."""
    init_from: str = ""
    """A local Hugging Face model folder to continue pretraining from (its config and weights replace
    the preset; overrides still apply). Nothing is downloaded."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk of the fused lm_head + cross-entropy of causal-LM training steps
    (``pretrain.loss``: no full ``(B, T, V)`` float32 logits); 0 = transformers' own loss. Used where
    the model and ZeRO stage allow it (llama-style and GPT-2 heads, stages 0-2), else off with a log line."""
    attention: Attention = "sdpa"
    """Attention kernel (transformers' ``attn_implementation``): sdpa (torch's scaled_dot_product_attention),
    flash_attention_2 (the flash-attn package, CUDA only), flex_attention (torch FlexAttention, CUDA only for
    training), eager (plain matmuls). All keep document masking; one that cannot run here is refused before
    training (pretrain.model.attention_problem)."""


@dataclass
class BlendEntry:
    path: str = ""
    """A prepared dataset folder."""
    weight: float = 1.0
    """Relative sampling weight (normalised over the blend)."""


@dataclass
class DataConfig:
    path: str = ""
    """Prepared dataset folder (holds ``manifest.json``); the fast path."""
    blend: List[BlendEntry] = field(default_factory=list)
    """Instead of ``path``: several prepared datasets sampled by weight (Megatron-style blend, seeded by
    ``seed``; data_prep.blend). Same tokenizer, seq_len and objective required."""
    raw_inputs: List[str] = field(default_factory=list)
    """Instead of ``path``: raw corpus paths / globs streamed and tokenized on the fly (slower; see
    pretrain.sources). Needs ``seq_len``."""
    raw_text_column: str = "text"
    """Text field of jsonl / parquet records in ``raw_inputs``."""
    raw_val_fraction: float = 0.005
    """Fraction of ``raw_inputs`` documents (by content hash) held out for validation."""
    tokenizer: str = ""
    """Tokenizer folder; its fingerprint must equal the manifest's."""
    eval_batches: int = 16
    """Validation micro batches per data-parallel rank for each evaluation."""
    document_masking: bool = True
    """Causal LMs: block-diagonal attention per document in packed sequences, and no loss on the
    EOS -> next document transition. False trains on packed sequences as one stream (GPT-2 style).
    Masked LMs: each token attends within its document (ModernBERT's packed recipe, block-diagonal mask);
    False attends across the separators of a packed sequence (RoBERTa's FULL-SENTENCES)."""
    save_data_indices: bool = False
    """Write the sample indices each rank trained on to ``run_dir/data-indices/rank{r}.tsv`` (as OLMo does)."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate reached after warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""
    schedule: Schedule = "cosine"
    """Learning-rate schedule after linear warmup: cosine (to ``min_lr_ratio``), linear (to 0), constant,
    or wsd: warmup-stable-decay (Hu et al. 2024, MiniCPM), constant then a cosine decay to ``min_lr_ratio``
    over the last ``decay_fraction`` of the steps."""
    decay_fraction: float = 0.2
    """wsd only: fraction of ``max_steps`` spent in the final decay."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; never applied to norms and biases."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2); 0.95 for beta2 as in GPT-3 / Llama."""
    eps: float = 1e-8
    """AdamW epsilon added to the denominator (PyTorch default)."""
    grad_clip: float = 1.0
    """Max global gradient L2 norm; 0 disables clipping."""


@dataclass
class DeepSpeedConfig:
    zero_stage: ZeroStage = 2
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    precision: Precision = "bf16"
    """Training dtype: fp32, bf16 or fp16 (dynamic loss scaling)."""
    micro_batch_size: int = 8
    """Sequences per data-parallel rank per forward/backward (micro batch)."""
    gradient_accumulation_steps: int = 1
    """Micro batches accumulated per optimizer step."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (transformers gradient checkpointing):
    less memory, about a third more compute."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer states and the step on the CPU (ZeRO stage >= 1)."""
    offload_params: bool = False
    """ZeRO-Infinity style parameter offload to CPU (ZeRO stage 3 only)."""
    config_file: str = ""
    """A user ds_config.json merged over the generated one: its keys win, except the batch keys
    (train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps) and the precision
    sections, which lmforge owns and which must agree with this config if present."""


@dataclass
class MLMConfig:
    """Dynamic masking for masked-LM presets (BERT recipe, Devlin et al. 2019)."""

    probability: float = 0.15
    """Fraction of non-special tokens selected for prediction."""
    mask_replace_prob: float = 0.8
    """Of the selected, the fraction replaced by the mask token."""
    random_replace_prob: float = 0.1
    """Of the selected, the fraction replaced by a random token (the rest stay unchanged)."""
    eval_probability: float = 0.0
    """Fraction of non-special tokens masked in validation; 0 = ``probability``. ModernBERT trains at 0.3 and
    evaluates at 0.15 (Warner et al. 2024), so its validation loss compares with BERT's."""
    whole_word_mask: bool = False
    """Select whole words (every sub-token); transformers then always uses the mask token."""


@dataclass
class CheckpointConfig:
    save_every_steps: int = 0
    """Optimizer steps between checkpoints; 0 = none by step count (one is always saved at the end)."""
    save_every_minutes: float = 0.0
    """Wall-clock minutes between checkpoints; 0 = none by time."""
    keep_last: int = 3
    """Newest complete checkpoints kept; 0 keeps all."""
    keep_every_steps: int = 0
    """Also keep checkpoints whose step is a multiple of this; 0 = none."""
    export_every_steps: int = 0
    """Also write a verified Hugging Face folder (run_dir/hf/step_XXXXXXXX) in a background process at
    every checkpoint whose step is a multiple of this; 0 = never. Needs save_every_steps to divide it."""
    resume: str = "auto"
    """auto: resume from the newest complete checkpoint if any; never: refuse to start over an existing
    checkpoint; otherwise a checkpoint tag (step_00000100) or the path of a checkpoint folder."""


@dataclass
class PreemptionConfig:
    signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank save at the next step boundary and exit with code 75."""
    requeue: bool = False
    """Under Slurm, run ``scontrol requeue $SLURM_JOB_ID`` after the preemption save."""
    max_minutes: float = 0.0
    """Wall-clock budget in minutes; when spent, save and exit with code 75 as on a signal. 0 = none."""
    poll_every_steps: int = 1
    """Optimizer steps between the all-reduces that agree on a stop (signal, time budget) and a time-based
    save; the last step always polls. Above 1 saves a collective and a host-device sync per step, and
    reacts up to that many steps later (keep the signal's grace time above that many steps plus a save)."""


@dataclass
class GuardConfig:
    max_consecutive_nonfinite: int = 5
    """Consecutive skipped (non-finite loss or gradient norm) steps that stop training."""
    spike_factor: float = 3.0
    """A loss above this factor times the rolling mean is logged as a spike; 0 disables."""
    spike_window: int = 50
    """Optimizer steps in the rolling mean of the spike detector."""


@dataclass
class DebugConfig:
    """Fault injection for the fault-tolerance tests; all off by default."""

    inject_nan_at_steps: List[int] = field(default_factory=list)
    """Optimizer steps (1-based) whose loss is made NaN on rank 0."""
    kill_at_step: int = 0
    """SIGKILL every rank right after this optimizer step; 0 = never."""
    crash_in_save: str = ""
    """SIGKILL at this point of the next save: after_engine_save, before_rename or before_latest."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    """Folder for metrics.jsonl, the resolved config, checkpoints/ and TensorBoard logs."""
    seq_len: int = 0
    """Tokens per sequence; 0 = the prepared data's seq_len (must match it otherwise)."""
    max_steps: int = 100
    """Optimizer steps to train."""
    seed: int = 1234
    """Seed of model init and of the global sample order."""
    log_every_steps: int = 10
    """Optimizer steps between metrics.jsonl records."""
    eval_every_steps: int = 0
    """Optimizer steps between validation passes; 0 = only at the start and the end."""
    show_progress: bool = True
    """Rank-0 tqdm bar."""
    wandb_project: str = ""
    """Weights & Biases project to log metrics to from rank 0 (needs ``wandb`` installed); empty = off."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for MFU; 0 = look up the GPU (pretrain.flops), none on CPU."""
    compile: bool = False
    """torch.compile the model (DeepSpeed's ``engine.compile()``, inductor backend) before the first step; the
    compile time of the first steps is logged once. Same losses as eager within rounding."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        """Raise one :class:`ConfigError` listing every bad key, its value and what is allowed."""
        p = self.problems()
        if p:
            raise ConfigError("invalid config: " + "; ".join(p))

    def problems(self) -> list[str]:
        """Every value this config's types cannot express, as ``key=value (allowed: ...)`` strings."""
        from pretrain.model import PRESETS

        p: list[str] = []
        ds, opt = self.deepspeed, self.optim
        if self.model.preset not in PRESETS and not self.model.init_from:
            p.append(f"model.preset={self.model.preset!r} (allowed: {', '.join(sorted(PRESETS))})")
        for key, value, low in [("deepspeed.micro_batch_size", ds.micro_batch_size, 1),
                                ("deepspeed.gradient_accumulation_steps", ds.gradient_accumulation_steps, 1),
                                ("max_steps", self.max_steps, 1), ("log_every_steps", self.log_every_steps, 1),
                                ("eval_every_steps", self.eval_every_steps, 0),
                                ("checkpoint.save_every_steps", self.checkpoint.save_every_steps, 0),
                                ("checkpoint.keep_last", self.checkpoint.keep_last, 0),
                                ("checkpoint.keep_every_steps", self.checkpoint.keep_every_steps, 0),
                                ("checkpoint.export_every_steps", self.checkpoint.export_every_steps, 0),
                                ("guard.max_consecutive_nonfinite", self.guard.max_consecutive_nonfinite, 1),
                                ("guard.spike_window", self.guard.spike_window, 1),
                                ("preemption.poll_every_steps", self.preemption.poll_every_steps, 1),
                                ("seq_len", self.seq_len, 0), ("optim.warmup_steps", opt.warmup_steps, 0),
                                ("data.eval_batches", self.data.eval_batches, 0), ("model.vocab_size", self.model.vocab_size, 0),
                                ("model.loss_chunk_tokens", self.model.loss_chunk_tokens, 0)]:
            if value < low:
                p.append(f"{key}={value} (allowed: >= {low})")
        if not opt.lr > 0:
            p.append(f"optim.lr={opt.lr} (allowed: > 0)")
        ck = self.checkpoint
        if ck.export_every_steps and (not ck.save_every_steps or ck.export_every_steps % ck.save_every_steps):
            p.append(f"checkpoint.export_every_steps={ck.export_every_steps} must be a multiple of "
                     f"checkpoint.save_every_steps={ck.save_every_steps} (exports are made from checkpoints)")
        m = self.mlm
        if not 0 < m.probability < 1 or not 0 <= m.mask_replace_prob <= 1 or not 0 <= m.random_replace_prob <= 1 \
                or m.mask_replace_prob + m.random_replace_prob > 1:
            p.append(f"mlm.probability={m.probability}, mask_replace_prob={m.mask_replace_prob}, random_replace_prob="
                     f"{m.random_replace_prob} (allowed: probability in (0, 1), the two replace fractions sum to <= 1)")
        if not 0 <= m.eval_probability < 1:
            p.append(f"mlm.eval_probability={m.eval_probability} (allowed: [0, 1); 0 = mlm.probability)")
        if not 0 < opt.decay_fraction <= 1:
            p.append(f"optim.decay_fraction={opt.decay_fraction} (allowed: (0, 1])")
        if ds.offload_optimizer and ds.zero_stage == 0:
            p.append("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1")
        if ds.offload_params and ds.zero_stage != 3:
            p.append("deepspeed.offload_params=true needs deepspeed.zero_stage=3")
        if not 0 <= opt.min_lr_ratio <= 1:
            p.append(f"optim.min_lr_ratio={opt.min_lr_ratio} (allowed: [0, 1])")
        if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
            p.append(f"optim.betas={list(opt.betas)} (allowed: two values in [0, 1))")
        import signal

        bad_signals = [n for n in self.preemption.signals if not isinstance(getattr(signal, n, None), signal.Signals)]
        if bad_signals:
            p.append(f"preemption.signals={bad_signals} (allowed: signal names such as SIGTERM, SIGUSR1)")
        from pretrain.checkpoint import CRASH_POINTS

        if self.debug.crash_in_save not in CRASH_POINTS:
            p.append(f"debug.crash_in_save={self.debug.crash_in_save!r} (allowed: {', '.join(CRASH_POINTS[1:])})")
        for key, value in [("checkpoint.save_every_minutes", self.checkpoint.save_every_minutes),
                           ("preemption.max_minutes", self.preemption.max_minutes)]:
            if value < 0:
                p.append(f"{key}={value} (allowed: >= 0)")
        if self.wandb_project:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                p.append(f"wandb_project={self.wandb_project!r} but wandb is not installed (pip install wandb)")
        if not self.data.tokenizer:
            p.append("data.tokenizer is required")
        sources = [k for k in ("path", "blend", "raw_inputs") if getattr(self.data, k)]
        if len(sources) != 1:
            p.append("data.path is required (or data.blend or data.raw_inputs)" if not sources
                     else f"give one of data.path, data.blend, data.raw_inputs, not {' and '.join(sources)}")
        if self.data.raw_inputs and self.seq_len == 0:
            p.append("seq_len is required with data.raw_inputs (there is no manifest to take it from)")
        return p


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults < YAML file < dotted overrides, type-checked and validated, every problem reported at once.

    Raises:
        ConfigError: unreadable YAML or override syntax (alone: nothing else can be checked then), or
            one message listing every unknown key (with the keys allowed there), every value of the
            wrong type or outside its ``Literal`` (with the allowed values), and every value
            :meth:`TrainConfig.problems` rejects.
    """
    raw = _merged_input(path, overrides)
    problems: list[str] = []
    cfg = None
    for _ in range(8):  # drop each bad key and type-check again, so the valid rest is checked too
        try:
            cfg = _adapter().validate_python(raw)
            break
        except _validation_error() as exc:
            for err in exc.errors():
                problems.append(_describe(err))
                _drop(raw, err["loc"])
    if cfg is None:
        raise ConfigError("invalid config: " + "; ".join(problems))
    problems += [q for q in cfg.problems() if not any(q.split("=")[0] == k.split("=")[0].split(":")[0] for k in problems)]
    if problems:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}invalid config: " + "; ".join(problems))
    return cfg


def _merged_input(path: str | Path | None, overrides: Sequence[str]) -> dict:
    """The YAML file merged with the dotted overrides, as plain containers (no type checks yet)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        base = OmegaConf.create({})
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{path}: config file not found")
            base = OmegaConf.load(str(path))
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, not {type(raw).__name__}")
    return raw


def _adapter():
    from pydantic import TypeAdapter

    for cls in _config_classes(TrainConfig):
        cls.__pydantic_config__ = STRICT  # type: ignore[attr-defined]
    return TypeAdapter(TrainConfig)


def _validation_error() -> type[Exception]:
    from pydantic import ValidationError

    return ValidationError


def _config_classes(cls: type) -> list[type]:
    """``cls`` and every config dataclass nested in it (fields, list items)."""
    import typing

    out = [cls]
    for f in dataclasses.fields(cls):
        for t in (typing.get_type_hints(cls)[f.name], *get_args(typing.get_type_hints(cls)[f.name])):
            if dataclasses.is_dataclass(t) and t not in out:
                out += [c for c in _config_classes(t) if c not in out]  # type: ignore[arg-type]
    return out


def _section(loc: tuple) -> type | None:
    """The config dataclass at ``loc`` (a key path, list indices included), or None past a free-form field."""
    import typing

    cls: Any = TrainConfig
    for part in loc:
        if isinstance(part, int):
            continue
        hint = typing.get_type_hints(cls).get(part)
        cls = next((t for t in (hint, *get_args(hint)) if dataclasses.is_dataclass(t)), None)
        if cls is None:
            return None
    return cls


def _describe(err: dict) -> str:
    """One pydantic error as ``key=value (allowed: ...)``."""
    loc = tuple(err["loc"])
    key = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in loc).replace(".[", "[")
    kind, value = err["type"], err.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        section = _section(loc[:-1])
        allowed = ", ".join(f.name for f in dataclasses.fields(section)) if section else "?"
        return f"{key}: unknown key (allowed here: {allowed})"
    if kind == "literal_error":
        return f"{key}={value!r} (allowed: {err['ctx']['expected'].replace(' or ', ', ')})"
    return f"{key}={value!r}: {err['msg']}"


def _drop(raw: dict, loc: tuple) -> None:
    """Remove the value at ``loc`` from the nested input, so its default is used on the next check."""
    node: Any = raw
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(loc[-1], None)
    elif isinstance(node, list) and isinstance(loc[-1], int) and loc[-1] < len(node):
        node.pop(loc[-1])


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written to the run dir and into every checkpoint)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
