"""Rank-0 metrics sink: ``metrics.jsonl`` (one JSON object per record), TensorBoard scalars, and
Weights & Biases when a project is configured."""
from __future__ import annotations

import json
import math
from pathlib import Path

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
            except ImportError:  # tensorboard is optional at run time; metrics.jsonl is not
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            if wandb_project:
                import wandb  # checked at config validation time

                self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), name=run_dir.name, config=config,
                                         resume="allow", id=run_dir.name)

    def write(self, record: dict) -> None:
        """Write one record; it must hold ``step``. Non-finite floats are written as null (valid JSON)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
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
