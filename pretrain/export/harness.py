"""Release evaluation of an exported folder with EleutherAI's lm-evaluation-harness (the ``lm-eval`` package).

``lmforge eval HF_DIR --tasks T[,T...]`` and ``lmforge export --eval-tasks ...`` call
:func:`evaluate_folder`: the harness's own Hugging Face backend (``model="hf"``) loads the folder with
``AutoModelForCausalLM`` and scores the tasks; lmforge only finds the tasks, runs it and keeps the
figures (``{task: {metric: value}}``) for ``--json`` and the model card's ``model-index`` (:func:`pretrain.export.model_card.harness_results`).

Tasks are the harness's registry plus any folder of task YAMLs given as ``include_path``. A local
task may name its data as ``dataset_path: json`` with ``data_files`` relative to the YAML's folder:
lmforge rewrites those paths to absolute ones in a temporary copy, because the harness resolves them
against the working directory. Nothing is downloaded for such a task; the standard tasks download
their datasets as the harness always does.

Masked LMs are refused with one line: the harness's tasks are log-likelihoods of continuations
under a causal LM (``loglikelihood`` / ``loglikelihood_rolling`` requests), which an encoder does not
define; a pseudo-log-likelihood (Salazar et al. 2020) would be a different metric under the same name.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.errors import ExportError
from pretrain.model import MASKED_LM_TYPES

EVAL_EXTRA_HINT = "pip install 'lmforge[eval]' (lm-eval)"
NOT_METRICS = frozenset({"alias", "sample_len", "samples"})
"""Keys of a harness result that are bookkeeping, not metrics."""


@dataclass
class HarnessResult:
    """What one harness run measured on one folder."""

    tasks: dict[str, dict[str, float]]
    """``{task: {metric: value}}``, e.g. ``{"lmforge_code_mc": {"acc": 0.5, "acc_stderr": 0.15}}``."""
    samples: dict[str, int]
    """Documents scored per task (after ``limit``)."""
    limit: int | None
    """Documents per task the run was limited to; None = all."""
    lm_eval_version: str
    settings: dict[str, Any] = field(default_factory=dict)
    """The harness call's settings (backend, dtype, batch size, device, few-shot), for the record."""

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "samples": self.samples, "limit": self.limit,
                "lm_eval_version": self.lm_eval_version, "settings": self.settings}


def evaluate_folder(hf_dir: str | Path, tasks: list[str], limit: int | None = None,
                    include_path: str | Path | None = None, batch_size: int = 8, device: str = "cpu",
                    num_fewshot: int | None = None) -> HarnessResult:
    """Run lm-evaluation-harness ``tasks`` on the exported causal LM in ``hf_dir``.

    Args:
        tasks: harness task (or group) names.
        limit: score at most this many documents per task (None = all).
        include_path: a folder of extra task YAMLs (local tasks).
        batch_size: sequences per forward pass of the harness's HF backend.
        device: torch device string (``cpu``, ``cuda``, ``cuda:0``).

    Raises:
        ExportError: ``hf_dir`` is not an exported folder, it holds a masked LM, lm-eval is not
            installed, or a task name is unknown (the message lists the unknown ones).
    """
    hf_dir = Path(hf_dir)
    _check_folder(hf_dir)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ExportError(f"lmforge eval needs lm-evaluation-harness: {EVAL_EXTRA_HINT}") from None
    with tempfile.TemporaryDirectory(prefix="lmforge-tasks-") as tmp:
        include = _localized_tasks(Path(include_path), Path(tmp)) if include_path else None
        manager = TaskManager(include_path=include, include_defaults=False) if include else None
        if manager is None or any(not manager.match_tasks([t]) for t in tasks):
            manager = TaskManager(include_path=include)  # the whole registry: indexing it takes ~10-25 s
        unknown = [t for t in tasks if not manager.match_tasks([t])]
        if unknown:
            where = f" (registry + {include_path})" if include_path else ""
            raise ExportError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}; "
                              "list them with `python -m lm_eval ls tasks`")
        settings = {"model": "hf", "dtype": "float32", "batch_size": batch_size, "device": device,
                    "num_fewshot": num_fewshot}
        out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"},
                                      tasks=list(tasks), num_fewshot=num_fewshot, batch_size=batch_size,
                                      device=device, limit=limit, task_manager=manager, log_samples=False)
    if out is None:  # simple_evaluate returns None on ranks other than 0 only
        raise ExportError("lm-eval returned no results")
    return HarnessResult(tasks=_metrics(out["results"]),
                         samples={k: int(v.get("effective", v.get("original", 0))) for k, v in out.get("n-samples", {}).items()},
                         limit=limit, lm_eval_version=getattr(lm_eval, "__version__", "?"), settings=settings)


def _check_folder(hf_dir: Path) -> None:
    config = hf_dir / "config.json"
    if not config.is_file():
        raise ExportError(f"{hf_dir}: not an exported model folder (no config.json)")
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    if model_type in MASKED_LM_TYPES:
        raise ExportError(f"{hf_dir}: {model_type} is a masked LM; lm-evaluation-harness tasks score log-likelihoods "
                          "of continuations under a causal LM, which an encoder does not define (see pretrain/export/harness.py)")


def _localized_tasks(src: Path, dst: Path) -> str:
    """Copy ``src``'s task YAMLs (and their data) to ``dst`` with relative ``data_files`` made absolute."""
    import yaml

    if not src.is_dir():
        raise ExportError(f"--include-path {src}: not a folder of lm-eval task YAMLs")
    for path in sorted(src.iterdir()):
        if path.suffix not in (".yaml", ".yml"):
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        files = (doc.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            doc["dataset_kwargs"]["data_files"] = {k: _absolute(src, v) for k, v in files.items()}
        elif files is not None:
            doc["dataset_kwargs"]["data_files"] = _absolute(src, files)
        (dst / path.name).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    for path in sorted(src.iterdir()):  # helper files a YAML may `include:` (utils.py, a base YAML)
        if path.is_file() and path.suffix not in (".yaml", ".yml") and not (dst / path.name).exists():
            shutil.copy2(path, dst / path.name)
    return str(dst)


def _absolute(base: Path, value: Any) -> Any:
    if isinstance(value, list):
        return [_absolute(base, v) for v in value]
    if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
        return str((base / value).resolve())
    return value


def _metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"acc,none": 0.5, "alias": ...}`` per task as ``{"acc": 0.5}`` (the default filter only)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        metrics = {}
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if filt in ("none", "") and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and name not in NOT_METRICS:
                metrics[name] = float(value)
        out[task] = metrics
    return out

