"""What one rank's training loop is made of: :class:`Run`, built once by ``pretrain.trainer``, and the
Protocols of its parts where the type is a choice (the engine, the data source, the input builder)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Protocol

from pretrain.config import TrainConfig
from pretrain.data import MicroBatch
from pretrain.distributed import DistInfo
from pretrain.layout import CHECKPOINT_DIR

if TYPE_CHECKING:
    import torch


class Engine(Protocol):
    """The part of ``deepspeed.DeepSpeedEngine`` the trainer uses (``pretrain.engine.initialize_engine``)."""

    device: torch.device
    module: torch.nn.Module
    """The wrapped transformers model."""

    def __call__(self, **inputs: Any) -> Any:
        """Forward; returns the model output (``.loss``: scalar tensor, nats per predicted token)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """Optimizer step at gradient-accumulation boundaries (a no-op on the other micro steps)."""

    def was_step_applied(self) -> bool:
        """False when the last optimizer step was skipped (non-finite gradient norm)."""

    def get_lr(self) -> list[float]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> Any: ...

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool,
                        load_lr_scheduler_states: bool) -> tuple[str | None, dict]: ...


class DataSource(Protocol):
    """Training and validation micro batches: ``pretrain.sources.ShardSource`` or ``StreamingSource``."""

    @property
    def num_train_sequences(self) -> int | None:
        """Sequences in the train split; None when streamed (unknown before reading it all)."""

    def train_batches(self, rank: int, world_size: int, micro_batch_size: int, seed: int,
                      consumed_samples: int) -> Iterator[MicroBatch]:
        """This rank's endless micro batches, starting after ``consumed_samples`` sequences of all ranks."""

    def val_batches(self, rank: int, world_size: int, micro_batch_size: int, max_batches: int) -> list[MicroBatch]:
        """This rank's fixed validation micro batches, the same number on every rank."""


class InputBuilder(Protocol):
    """MicroBatch -> model inputs: ``pretrain.inputs.causal_lm_inputs`` (wrapped) or ``MaskedLMInputs``."""

    def __call__(self, mb: MicroBatch) -> dict[str, Any]:
        """``(B, T)`` int64 arrays (``input_ids``, ``labels`` ...), flags (``use_cache``) and, for masked LMs, a
        ``(B, 1, T, T)`` bool attention mask or a per-layer-type mapping of them."""


@dataclass
class Run:
    """Everything one rank's loop needs, built once by ``pretrain.trainer._setup``."""

    cfg: TrainConfig
    dist: DistInfo
    engine: Engine
    source: DataSource
    inputs: InputBuilder
    """Built once per run (the MLM collator loads the tokenizer)."""
    val_batches: list[MicroBatch]
    """This rank's fixed validation micro batches."""
    seq_len: int
    """Tokens per sequence."""
    global_batch: int
    """Sequences per optimizer step over all ranks."""
    fingerprints: dict[str, str]
    """sha256 of the tokenizer and of the data, recorded in checkpoints."""
    objective: Literal["clm", "mlm"]
    """From the model architecture."""
    flops_per_token: float
    """Training FLOPs per token, 6N + 12LHQT (pretrain.flops)."""
    peak_flops: float | None
    """Peak FLOP/s of one device, None when unknown (CPU)."""
    resume_from: Path | None
    """Complete checkpoint to resume from, or None for a fresh start."""
    resume_universal: bool
    """The resume checkpoint was saved at another world size (load through the universal format)."""
    eval_inputs: InputBuilder | None = None
    """Inputs of validation batches when they differ from training's (MLM ``eval_probability``); None = ``inputs``."""
    val_tokens_per_byte: float | None = None
    """Validation split's tokens per UTF-8 byte of text (manifest), for bits per byte; None = unknown or masked LM."""

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.run_dir) / CHECKPOINT_DIR

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all ranks (padding included)."""
        return self.global_batch * self.seq_len
