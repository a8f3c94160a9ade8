"""Training metrics: the rank-0 sink (:class:`MetricsWriter`: ``metrics.jsonl``, one JSON object per
record, TensorBoard scalars, and Weights & Biases when a project is configured) and the per-step
accounting that feeds it (:class:`MetricsLogger`: loss, throughput, MFU, the progress bar)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.checkpoint import TrainState
    from pretrain.run import Run

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends records to ``run_dir/metrics.jsonl`` and ``run_dir/tensorboard``; inert when ``enabled`` is False."""

    def __init__(self, run_dir: str | Path, enabled: bool, wandb_project: str = "", config: dict | None = None):
        self.enabled = enabled
        self._fh = None
        self._tb = None
        self._wandb = None
        if enabled:
            run_dir = Path(run_dir)
            self._fh = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time; metrics.jsonl is not
                self._tb = None
            if wandb_project:
                import wandb  # checked at config validation time

                self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), name=run_dir.name, config=config,
                                         resume="allow", id=run_dir.name)

    def write(self, record: dict) -> None:
        """Write one record; it must hold ``step``. Non-finite floats are written as null (valid JSON)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        assert self._fh is not None  # opened when enabled
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        scalars = {k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class MetricsLogger:
    """Owns the logging cadence: every ``log_every_steps`` steps and at the last one, a record of the mean
    training loss since the last record (over the applied steps and all ranks; NaN when none was applied),
    learning rate, throughput, MFU and peak memory; and the rank-0 progress bar.

    Made right before the first step: its clock, and the token count it measures throughput from, start then.
    """

    def __init__(self, writer: MetricsWriter, run: Run, state: TrainState):
        from tqdm.auto import tqdm

        cfg = run.cfg
        self.writer, self.run = writer, run
        self.every_steps, self.max_steps = cfg.log_every_steps, cfg.max_steps
        self.bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                        disable=not (run.dist.is_main and cfg.show_progress))
        self.start_s = self._last_s = time.perf_counter()
        self.start_tokens = self._last_tokens = state.tokens
        self._loss_sum, self._loss_steps = 0.0, 0

    def after_step(self, state: TrainState, loss: float, applied: bool, loss_spikes: int) -> None:
        """Account one optimizer step; collective (one all-reduce) on the steps of the cadence."""
        if applied:
            self._loss_sum, self._loss_steps = self._loss_sum + loss, self._loss_steps + 1
        self.bar.update(1)
        if state.step % self.every_steps == 0 or state.step == self.max_steps:
            self._write(state, loss_spikes)

    def _write(self, state: TrainState, loss_spikes: int) -> None:
        from pretrain.distributed import all_reduce_sum
        from pretrain.flops import peak_memory_gib

        run, world_size = self.run, self.run.dist.world_size
        (loss_sum,) = all_reduce_sum([self._loss_sum / max(self._loss_steps, 1)])
        now = time.perf_counter()
        tokens_per_s = (state.tokens - self._last_tokens) / (now - self._last_s)
        record = {"step": state.step, "loss": loss_sum / world_size if self._loss_steps else float("nan"),
                  "lr": run.engine.get_lr()[0], "tokens_per_s": tokens_per_s,
                  "consumed_samples": state.consumed_samples, "tokens": state.tokens,
                  "skipped_steps": state.skipped_steps, "loss_spikes": loss_spikes, "rollbacks": state.rollbacks,
                  "skipped_samples": state.skipped_samples,
                  "peak_mem_gib": round(peak_memory_gib(), 3)}
        if run.peak_flops:  # model FLOPs utilization: achieved / peak FLOP/s over all devices
            record["mfu"] = record["tokens_per_s"] * run.flops_per_token / (world_size * run.peak_flops)
        self.writer.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}")
        self._loss_sum, self._loss_steps, self._last_s, self._last_tokens = 0.0, 0, now, state.tokens

    def throughput(self, state: TrainState) -> tuple[float, float]:
        """``(seconds since the first step, tokens per second over them)`` of this start, not a resumed run's past."""
        elapsed_s = time.perf_counter() - self.start_s
        return elapsed_s, (state.tokens - self.start_tokens) / max(elapsed_s, 1e-9)

    def close(self) -> None:
        self.bar.close()
