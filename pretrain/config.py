"""Typed training config: a YAML file plus dotted CLI overrides (``optim.lr=1e-3``), via OmegaConf.

Every field states its unit. :func:`load_config` merges defaults < YAML < overrides (parsed by
OmegaConf), type-checks the result with pydantic against these dataclasses (``pretrain.config_check``:
``Literal`` fields list their allowed values; unknown keys are refused), then :meth:`TrainConfig.validate`
checks the values that depend on each other. Every problem of all three steps is reported in one
:class:`~pretrain.errors.ConfigError`. The DeepSpeed config is generated from this
(``pretrain.engine.build_ds_config``): one source of truth.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Sequence, get_args

from pretrain.config_check import check, consequence
from pretrain.config_input import merged_input
from pretrain.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
"""Training dtype names."""
ZeroStage = Literal[0, 1, 2, 3]
"""ZeRO stages (Rajbhandari et al. 2020): 0 = plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters."""
Schedule = Literal["cosine", "linear", "constant", "wsd"]
"""Learning-rate schedules after warmup."""
Attention = Literal["sdpa", "flash_attention_2", "flex_attention", "eager"]
"""Attention kernels: transformers' ``attn_implementation`` values."""
CrashPoint = Literal["", "after_engine_save", "before_rename", "before_latest"]
"""Fault-injection points inside a save (``debug.crash_in_save``; "" = none), for the kill-during-save tests."""
WritePoint = Literal["", "engine", "digests", "probe", "state"]
"""The writes of a save, in order (``debug.write_error_in_save``; "" = none): DeepSpeed's files and the RNG states
(every rank), the digest files (every rank), the probe and the state file (rank 0)."""
PRECISIONS: tuple[str, ...] = get_args(Precision)
ZERO_STAGES: tuple[int, ...] = get_args(ZeroStage)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
ATTENTIONS: tuple[str, ...] = get_args(Attention)


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
    max_epochs: float = 0.0
    """Most passes over this dataset during the run (a repetition cap, as OLMo-core's source mixtures); once
    reached, its share goes to the other datasets in proportion to their weights (data_prep.mixture).
    0 = no cap."""


@dataclass
class BlendPhase:
    step: int = 0
    """Optimizer step from which ``weights`` apply (blend sample ``step * global batch``)."""
    weights: List[float] = field(default_factory=list)
    """One relative weight per ``data.blend`` entry, in its order; 0 switches a dataset off in this phase."""


@dataclass
class DataConfig:
    path: str = ""
    """Prepared dataset folder (holds ``manifest.json``); the fast path."""
    blend: List[BlendEntry] = field(default_factory=list)
    """Instead of ``path``: several prepared datasets sampled by weight (Megatron-style blend, seeded by
    ``seed``; data_prep.blend). Same tokenizer, seq_len and objective required. Each entry:
    ``{path, weight, max_epochs}``, ``max_epochs`` the most passes over that dataset (a repetition cap; 0 = none)."""
    blend_schedule: List[BlendPhase] = field(default_factory=list)
    """Optional mixture schedule (a curriculum or an annealing phase): phases with increasing ``step``, each
    replacing the blend's weights from that step on (``[{step: 0, weights: [0.7, 0.3]}, {step: 1000, weights:
    [0.2, 0.8]}]``, one weight per ``data.blend`` entry, 0 = off); before the first phase (unless it starts at step 0)
    ``data.blend`` weights apply. Deterministic per sample index (data_prep.mixture); a resume refuses a
    changed schedule (it is part of the data fingerprint)."""
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
    verify_checksums: bool = False
    """Hash each prepared shard (sha256) the first time a rank opens it and stop with one line naming a shard
    that differs from its manifest record (bit rot, a partial copy). Costs 2.3 s per GB of shard when the
    file is in the page cache, per rank that opens it (median of 3 rounds on one AMD EPYC core at load 12,
    bench/bench_integrity.py); the size check is always on."""
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
    return_freed_memory: Literal["auto", "always", "never"] = "auto"
    """Have glibc map every host allocation of 1 MiB or more on its own, so that freeing it returns it to the OS
    (``pretrain.engine.return_large_frees_to_os``). Without it, the parameters ZeRO-3 gathers and frees layer after
    layer stay in the heap's holes and a CPU rank's resident set grows by GBs (issue 14). It costs speed wherever
    activations live in host memory: each one is mapped and faulted in again every step (a CPU rank of llama-tiny
    trained at 0.44-0.71x the HF Trainer's tokens/s with it, bench/bench_train.py). ``auto``: at ZeRO stage 3 only."""
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
    verify: Literal["off", "size", "checksum"] = "checksum"
    """How a resume checks the checkpoint it picks against the sizes and XXH3-128 digests recorded at save
    (pretrain.integrity): size compares byte counts (a stat per file); checksum also re-reads and hashes
    every byte: 0.35 s per GB of checkpoint with its pages cached, 0.75 s per GB read from the disk (medians
    of 3 rounds on a 1 GB checkpoint-like folder, one AMD EPYC core at load 12, bench/bench_integrity.py;
    a slower file system costs its read bandwidth); off trusts it. A bad checkpoint (a file, or its state
    file) is named with its bad file and the newest one that verifies is used instead. Every save hashes
    what it wrote whatever this is (0.5 s per GB in the same bench, about 6% of writing it, split over the ranks)."""


@dataclass
class PreemptionConfig:
    signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every rank save at the next step boundary and exit with code 75."""
    requeue: bool = False
    """Under Slurm, run ``scontrol requeue $SLURM_JOB_ID`` after the preemption save."""
    max_minutes: float = 0.0
    """Wall-clock budget in minutes; when spent, save and exit with code 75 as on a signal. 0 = none."""
    poll_every_steps: int = 0
    """Optimizer steps between the all-reduces that agree on a stop (signal, time budget) and a time-based
    save; the last step always polls. 0 (default) = every step on CPU ranks, every 10 steps on GPU ranks
    (``pretrain.preemption.AUTO_POLL_EVERY_STEPS_GPU``): on GPU the all-reduce's result is read back, a host-device sync per
    step, while a CPU step (seconds) dwarfs a 3-float gloo all-reduce. Above 1 the ranks react up to that
    many steps later: keep the signal's grace time above that many steps plus a save."""


@dataclass
class GuardConfig:
    max_consecutive_nonfinite: int = 5
    """Consecutive skipped (non-finite loss or gradient norm) steps that stop training."""
    spike_factor: float = 3.0
    """A loss above this factor times the rolling mean is logged as a spike; 0 disables."""
    spike_window: int = 50
    """Optimizer steps in the rolling mean of the spike detector."""
    rollback: bool = False
    """On a loss spike lasting ``spike_patience`` steps (or ``max_consecutive_nonfinite`` non-finite steps), restore
    the newest checkpoint saved before it began and skip ``skip_batches`` global batches, as PaLM did (Chowdhery
    et al. 2022, section 5.1); off: spikes are only logged. The spike test uses the loss averaged over all ranks."""
    spike_patience: int = 3
    """Consecutive spike steps (loss above ``spike_factor`` x the rolling mean) that trigger a rollback."""
    skip_batches: int = 200
    """Global batches of the sample order skipped after a rollback (PaLM skipped roughly 200-500)."""
    max_rollbacks: int = 3
    """Rollbacks allowed over the whole run; one more trigger stops training."""


@dataclass
class DistributedConfig:
    timeout_minutes: float = 30.0
    """Minutes a collective waits for the slowest rank before the run stops with the ranks that did not arrive
    (torch.distributed's process-group timeout; DeepSpeed's default is 10 minutes, torch's 30). Keep it above the
    longest rank-0-only pause (a save, an evaluation)."""


@dataclass
class DebugConfig:
    """Fault injection for the fault-tolerance tests; all off by default."""

    inject_nan_at_steps: List[int] = field(default_factory=list)
    """Optimizer steps (1-based) whose loss is made NaN on rank 0."""
    kill_at_step: int = 0
    """SIGKILL every rank right after this optimizer step; 0 = never."""
    crash_in_save: CrashPoint = ""
    """SIGKILL at this point of the next save: after_engine_save, before_rename or before_latest; "" = never."""
    spike_at_steps: List[int] = field(default_factory=list)
    """Optimizer steps (1-based) whose training loss rank 0 multiplies by ``spike_loss_factor`` (the gradient too),
    once per step number in a process: a replay of the step after a rollback is clean."""
    spike_loss_factor: float = 10.0
    """Factor of the injected loss spikes."""
    start_skip_batches: int = 0
    """Global batches skipped when this process starts (fresh or resumed), as a rollback skips them: the reference
    run of the rollback tests."""
    skip_batches_after_step: int = 0
    """Skip the ``start_skip_batches`` after this optimizer step instead of at start (once per process): a run from
    step 0 that skips the batches a rollback to this step's checkpoint skips; 0 = at start."""
    write_error_in_save: WritePoint = ""
    """This write of a save fails with a real EFBIG (it runs under a file size limit of 0 bytes): engine (DeepSpeed's
    files and the RNG states), digests, probe or state (see ``pretrain.checkpoint.WRITE_POINTS``)."""
    write_error_at_step: int = 0
    """The save of this optimizer step gets ``write_error_in_save``; 0 = every save (so the first one fails)."""
    sigterm_at_step: int = 0
    """Rank 0 sends itself SIGTERM after this optimizer step (1-based), or, with ``sigterm_in_eval``, inside the first
    evaluation forward after it (as a preemption notice would arrive); 0 = never."""
    sigterm_in_eval: bool = False
    """See ``sigterm_at_step``."""
    hang_at_step: int = 0
    """Rank 1 (or rank 0 of a world of one) sleeps for good before this optimizer step (1-based); 0 = never."""
    prebuilt_batches: bool = False
    """Read every micro batch the run will train on into memory before the first step (the same batches, from the
    same loader), so that step times exclude the loader: ``bench/bench_loader.py`` measures the loader in situ
    against it. Memory grows with ``max_steps``; for benchmarks only."""


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
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
        if self.model.preset not in PRESETS and not self.model.init_from:
            p.append(f"model.preset={self.model.preset!r} (allowed: {', '.join(sorted(PRESETS))})")
        return p + self._minimum_problems() + self._training_problems() + self._runtime_problems() + self._data_problems()

    def _minimum_problems(self) -> list[str]:
        """Counts and sizes below their minimum."""
        p: list[str] = []
        ds, opt = self.deepspeed, self.optim
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
                                ("guard.spike_patience", self.guard.spike_patience, 1),
                                ("guard.skip_batches", self.guard.skip_batches, 0),
                                ("guard.max_rollbacks", self.guard.max_rollbacks, 0),
                                ("debug.start_skip_batches", self.debug.start_skip_batches, 0),
                                ("debug.skip_batches_after_step", self.debug.skip_batches_after_step, 0),
                                ("debug.write_error_at_step", self.debug.write_error_at_step, 0),
                                ("preemption.poll_every_steps", self.preemption.poll_every_steps, 0),
                                ("seq_len", self.seq_len, 0), ("optim.warmup_steps", opt.warmup_steps, 0),
                                ("data.eval_batches", self.data.eval_batches, 0), ("model.vocab_size", self.model.vocab_size, 0),
                                ("model.loss_chunk_tokens", self.model.loss_chunk_tokens, 0)]:
            if value < low:
                p.append(f"{key}={value} (allowed: >= {low})")
        return p

    def _training_problems(self) -> list[str]:
        """Optimizer, schedule, checkpoint cadence, MLM masking and DeepSpeed offload combinations."""
        p: list[str] = []
        ds, opt = self.deepspeed, self.optim
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
        return p

    def _runtime_problems(self) -> list[str]:
        """Preemption signals, time limits and the metrics back-end."""
        p: list[str] = []
        import signal

        bad_signals = [n for n in self.preemption.signals if not isinstance(getattr(signal, n, None), signal.Signals)]
        if bad_signals:
            p.append(f"preemption.signals={bad_signals} (allowed: signal names such as SIGTERM, SIGUSR1)")
        for key, minutes in [("checkpoint.save_every_minutes", self.checkpoint.save_every_minutes),
                             ("preemption.max_minutes", self.preemption.max_minutes)]:
            if minutes < 0:
                p.append(f"{key}={minutes} (allowed: >= 0)")
        if not self.distributed.timeout_minutes > 0:
            p.append(f"distributed.timeout_minutes={self.distributed.timeout_minutes} (allowed: > 0)")
        if self.wandb_project:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                p.append(f"wandb_project={self.wandb_project!r} but wandb is not installed (pip install wandb)")
        return p

    def _data_problems(self) -> list[str]:
        """The tokenizer, exactly one data source, the blend schedule, seq_len for raw inputs."""
        p: list[str] = []
        if not self.data.tokenizer:
            p.append("data.tokenizer is required")
        sources = [k for k in ("path", "blend", "raw_inputs") if getattr(self.data, k)]
        if len(sources) != 1:
            p.append("data.path is required (or data.blend or data.raw_inputs)" if not sources
                     else f"give one of data.path, data.blend, data.raw_inputs, not {' and '.join(sources)}")
        p += _schedule_problems(self.data)
        if self.data.raw_inputs and self.seq_len == 0:
            p.append("seq_len is required with data.raw_inputs (there is no manifest to take it from)")
        return p


def _schedule_problems(data: DataConfig) -> list[str]:
    p = [f"data.blend[{i}].max_epochs={b.max_epochs} (allowed: >= 0, 0 = no cap)" for i, b in enumerate(data.blend) if b.max_epochs < 0]
    if data.blend_schedule and not data.blend:
        p.append("data.blend_schedule needs data.blend")
    steps = [ph.step for ph in data.blend_schedule]
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(s < 0 for s in steps):
        p.append(f"data.blend_schedule steps {steps} must be >= 0 and increasing")
    for i, ph in enumerate(data.blend_schedule):
        if data.blend and (len(ph.weights) != len(data.blend) or any(w < 0 for w in ph.weights) or not any(w > 0 for w in ph.weights)):
            p.append(f"data.blend_schedule[{i}].weights={ph.weights}: need {len(data.blend)} values (one per data.blend entry), >= 0, one > 0")
    return p


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults < YAML file < dotted overrides, type-checked and validated, every problem reported at once.

    Raises:
        ConfigError: unreadable YAML or override syntax (alone: nothing else can be checked then), or
            one message listing every unknown key (with the keys allowed there), every value of the
            wrong type or outside its ``Literal`` (with the allowed values), and every value
            :meth:`TrainConfig.problems` rejects.
    """
    raw = merged_input(path, overrides)
    cfg, problems = check(TrainConfig, raw)
    if cfg is None:
        raise ConfigError("invalid config: " + "; ".join(problems))
    problems += [q for q in cfg.problems() if not consequence(q, problems)]
    if problems:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}invalid config: " + "; ".join(problems))
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written to the run dir and into every checkpoint)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
