"""Export a ZeRO checkpoint (stages 0-3, any world size) to a verified Hugging Face folder.

``OUT`` holds::

    config.json                the run's RUN/model/config.json (architectures recorded at train time,
                               pretrain.model_files), dtype / torch_dtype set to the export's, vocab_size checked
                               against the embedding rows
    model.safetensors          weights; above --max-shard-size model-0000i-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json     the run's RUN/model/generation_config.json, as recorded at train time
    tokenizer.json, ...        the run's tokenizer files, byte for byte (same fingerprint)
    README.md, loss_curve.png  model card (pretrain.export.model_card)
    lmforge_export.json        provenance and the verification result; written last

Steps: read and cross-check the run (:mod:`pretrain.export.run_info`); plan the consolidation
(:mod:`pretrain.export.consolidate`, no tensor data); stream tensor by tensor into safetensors
(:mod:`pretrain.export.safetensors_writer`), casting the float32 master weights to ``dtype``; write the rest;
verify in a fresh process (``lmforge verify``, :mod:`pretrain.export.verify`); rename ``OUT.tmp`` to ``OUT``;
optionally push (:mod:`pretrain.export.hub`). A failed verification leaves ``OUT.tmp``, never ``OUT``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.errors import ExportError
from pretrain.export.consolidate import CheckpointPlan, TensorPlan, TensorReader, plan_checkpoint, pwrite_all
from pretrain.export.hub import PushOptions, push_folder
from pretrain.export.model_card import LOSS_CURVE_FILE, CardOptions, plot_loss_curve, render_card
from pretrain.export.run_info import RunInfo, load_run_info, resolve_checkpoint
from pretrain.export.safetensors_writer import INDEX_FILE, TensorSpec, write_sharded
from pretrain.export.torch_archive import FLOAT_DTYPES, ITEMSIZE
from pretrain.export.verify import PRECISION_DTYPES
from pretrain.model_files import CONFIG_FILE, GENERATION_CONFIG_FILE

log = logging.getLogger(__name__)

EXPORT_RECORD = "lmforge_export.json"
TMP_SUFFIX = ".tmp"
EXPORT_FILES = ("README.md", CONFIG_FILE, GENERATION_CONFIG_FILE, LOSS_CURVE_FILE, EXPORT_RECORD, INDEX_FILE)
"""Names the export writes itself; tokenizer files of the same name are not copied over them."""
EMBEDDING_RE = re.compile(r"(embed_tokens|word_embeddings|tok_embeddings|wte)\.weight$")
SIZE_RE = re.compile(r"^\s*(\d+(\.\d+)?)\s*(KB|MB|GB|TB)?\s*$", re.IGNORECASE)
SIZE_UNITS = {None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


@dataclass
class ExportOptions:
    dtype: str = "fp32"
    """Dtype of the exported floating-point weights: fp32 (the master weights as trained), bf16 or fp16."""
    max_shard_size: str = "5GB"
    """Largest safetensors file, bytes with an optional KB/MB/GB/TB suffix (powers of 10, as the Hub's)."""
    verify: bool = True
    """Reload in a fresh process and compare logits with the checkpoint's probe (never skip for a release)."""
    overwrite: bool = False
    """Replace an existing export folder."""
    card: CardOptions = field(default_factory=CardOptions)
    push: PushOptions | None = None
    """Push to the Hub after a successful export; None = local only."""
    eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on the verified folder; their figures go into the card's model-index."""
    eval_limit: int | None = None
    """Documents per eval task (None = all)."""
    eval_include_path: str | None = None
    """A folder of local lm-eval task YAMLs."""

    @property
    def max_shard_bytes(self) -> int:
        m = SIZE_RE.match(self.max_shard_size)
        assert m is not None  # validate() refused other sizes
        return int(float(m.group(1)) * SIZE_UNITS[m.group(3).upper() if m.group(3) else None])

    def validate(self) -> None:
        """Raise one ExportError naming every bad option."""
        problems = []
        if self.dtype not in PRECISION_DTYPES:
            problems.append(f"--dtype {self.dtype!r} (allowed: {', '.join(PRECISION_DTYPES)})")
        m = SIZE_RE.match(self.max_shard_size)
        if m is None or float(m.group(1)) <= 0:
            problems.append(f"--max-shard-size {self.max_shard_size!r} (expected a positive size such as 5GB, 500MB or 1000000)")
        if self.push is not None:
            problems += self.push.validate()
        if problems:
            raise ExportError("invalid export options: " + "; ".join(problems))


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as transformers writes its config files: indented by 2, keys sorted, a final newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_configs(tmp: Path, info: RunInfo, plan: CheckpointPlan, dtype: str) -> dict:
    """config.json (the run's, with the export's dtype) and generation_config.json (the run's, copied);
    returns the config written."""
    config = dict(info.model_config)
    rows = {t.shape[0] for t in plan.tensors if EMBEDDING_RE.search(t.name) and len(t.shape) == 2}
    if rows and rows != {config.get("vocab_size")}:
        raise ExportError(f"{info.model_dir / CONFIG_FILE}: vocab_size={config.get('vocab_size')} but the checkpoint's "
                          f"embedding has {sorted(rows)} rows")
    config["dtype"] = config["torch_dtype"] = PRECISION_DTYPES[dtype]  # torch_dtype: the name transformers 4 reads
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.setdefault(key, None)
    write_json(tmp / CONFIG_FILE, config)
    shutil.copy2(info.model_dir / GENERATION_CONFIG_FILE, tmp / GENERATION_CONFIG_FILE)
    return config


def _copy_tokenizer(tmp: Path, tokenizer_dir: Path) -> list[str]:
    copied = []
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file() and path.name not in EXPORT_FILES and not path.name.startswith("model"):
            shutil.copy2(path, tmp / path.name)
            copied.append(path.name)
    return copied


def _write_metadata(tmp: Path, info: RunInfo, plan: CheckpointPlan, options: ExportOptions,
                    export_name: str) -> tuple[list[str], dict[str, Any]]:
    """config.json, generation_config.json, tokenizer files, loss curve and README.md; returns
    ``(tokenizer files, card arguments)`` (the card is rendered again with the verification result)."""
    _write_configs(tmp, info, plan, options.dtype)
    tokenizer_files = _copy_tokenizer(tmp, info.tokenizer_dir)
    has_curve = plot_loss_curve(info, tmp / LOSS_CURVE_FILE)
    card_args: dict[str, Any] = {"info": info, "n_params": plan.n_params, "zero_stage": plan.zero_stage, "options": options.card,
                 "export_name": export_name, "has_curve": has_curve}
    (tmp / "README.md").write_text(render_card(**card_args), encoding="utf-8")
    return tokenizer_files, card_args


def _cast_writer(plans: list[TensorPlan]):
    """``write(reader, plan, dtype, fd, offset) -> bytes``: read ``plan``'s tensor (into one buffer reused
    for all of ``plans``), cast it to the torch dtype named ``dtype`` (round to nearest even, as torch's
    ``.to``) and write it at ``offset`` of ``fd``."""
    import torch

    buffer = torch.empty(max(t.numel * ITEMSIZE[t.dtype] for t in plans), dtype=torch.uint8)

    def write(reader: TensorReader, plan: TensorPlan, dtype: str, fd: int, offset: int) -> int:
        t = reader.read(plan, into=buffer).to(getattr(torch, dtype))
        return pwrite_all(fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()), offset)

    return write


def write_weights(tmp: Path, plan: CheckpointPlan, dtype: str, max_shard_bytes: int) -> list[str]:
    """Stream the planned tensors into safetensors files; floating-point ones cast to ``dtype``. Returns file names.

    Tensors stored in their output dtype (all of them for a float32 export of float32 master weights) are
    copied as stored, inside the kernel (:meth:`TensorReader.copy`); only casts import torch.
    """
    from tqdm.auto import tqdm

    out_dtype = PRECISION_DTYPES[dtype]
    by_name = {t.name: t for t in plan.tensors}
    specs = [TensorSpec(t.name, t.shape, out_dtype if t.dtype in FLOAT_DTYPES else t.dtype) for t in plan.tensors]
    casts = [t for t, s in zip(plan.tensors, specs) if t.dtype != s.dtype]
    cast = _cast_writer(casts) if casts else None
    total = sum(s.nbytes for s in specs)
    start = time.perf_counter()
    with TensorReader() as reader, tqdm(total=total, unit="B", unit_scale=True, desc="export", dynamic_ncols=True,
                                        disable=None) as bar:
        def write(spec: TensorSpec, fd: int, offset: int) -> int:
            t = by_name[spec.name]
            if t.dtype == spec.dtype:
                return reader.copy(t, fd, offset)
            assert cast is not None  # built for every tensor whose dtype changes
            return cast(reader, t, spec.dtype, fd, offset)

        files = write_sharded(tmp, specs, write, max_shard_bytes, plan.n_params, on_tensor=bar.update)
    log.info("consolidated %d tensors (%.3f GB, %s; %d cast) from ZeRO stage %d over %d rank(s) into %d file(s) in %.1f s",
             len(specs), total / 1e9, dtype, len(casts), plan.zero_stage, plan.world_size, len(files),
             time.perf_counter() - start)
    return files


def verify_in_fresh_process(hf_dir: Path, probe: Path, json_path: Path) -> dict:
    """Run ``lmforge verify`` on ``hf_dir`` in a new Python process; returns its result.

    Raises:
        ExportError: the verification failed; carries its one-line reason (e.g. by how much logits differ).
    """
    cmd = [sys.executable, "-m", "lmforge", "verify", str(hf_dir), "--probe", str(probe), "--json", str(json_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("lmforge")]
        reason = errors[-1].split("error: ", 1)[-1] if errors else f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"
        raise ExportError(f"verification in a fresh process failed: {reason}; the unverified export is left in {hf_dir}")
    return json.loads(json_path.read_text(encoding="utf-8"))


def export(checkpoint: str | Path, output: str | Path, options: ExportOptions | None = None) -> dict:
    """Export ``checkpoint`` (a checkpoint folder, or a run / checkpoints folder: its newest) to ``output``.

    Returns the export record (also ``output/lmforge_export.json``).

    Raises:
        ExportError: bad options, an existing ``output`` without ``overwrite``, a checkpoint that is
            incomplete or does not match its run, or a failed verification (``output`` is then not created).
        HubError: the push failed; ``output`` is complete and verified.
    """
    options = options or ExportOptions()
    options.validate()
    output = Path(output)
    if output.exists() and not options.overwrite:
        raise ExportError(f"{output}: already exists; pass --overwrite to replace it")
    tag_dir = resolve_checkpoint(checkpoint)
    info = load_run_info(tag_dir)
    if options.verify and info.probe is None:
        raise ExportError(f"{tag_dir}: no probe.safetensors, so the export cannot be verified; --no-verify exports it unchecked")
    plan = plan_checkpoint(tag_dir)
    log.info("exporting %s (step %d, ZeRO stage %d, %d rank(s), %.2fM parameters) -> %s", tag_dir, info.step,
             plan.zero_stage, plan.world_size, plan.n_params / 1e6, output)
    tmp = output.with_name(output.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=1) as pool:  # configs and card (imports, a plot) overlap the weights' I/O
        metadata = pool.submit(_write_metadata, tmp, info, plan, options, output.name)
        files = write_weights(tmp, plan, options.dtype, options.max_shard_bytes)
        tokenizer_files, card_args = metadata.result()
    verification = None
    if options.verify:
        assert info.probe is not None  # checked above: a verified export needs the probe
        verification = verify_in_fresh_process(tmp, info.probe, output.with_name(output.name + ".verify.json"))
        output.with_name(output.name + ".verify.json").unlink()
        (tmp / "README.md").write_text(render_card(**card_args, verification=verification), encoding="utf-8")
        log.info("verified in a fresh process: logits within %.3g of the training engine's (%s, %s), %s works",
                 verification["max_abs_logit_diff"], verification["precision"],
                 "bit-identical required" if verification["exact"] else verification["inexact_reason"],
                 verification["pipeline"])
    else:
        log.warning("%s: exported WITHOUT verification (--no-verify)", output)
    harness = _evaluate(tmp, options) if options.eval_tasks else None
    if harness is not None:
        (tmp / "README.md").write_text(render_card(**card_args, verification=verification, harness=harness), encoding="utf-8")
    record = {"checkpoint": str(tag_dir.resolve()), "tag": tag_dir.name, "step": info.step, "tokens": int(info.state["tokens"]),
              "zero_stage": plan.zero_stage, "world_size": plan.world_size, "dtype": options.dtype,
              "n_params": plan.n_params, "weights": files, "tied": plan.aliases, "tokenizer_files": tokenizer_files,
              "verified": verification is not None, "verification": verification,
              "evaluation": harness.to_json() if harness else None, "created_unix_s": round(time.time(), 3)}
    (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    log.info("export complete: %s", output)
    if options.push is not None:
        record["pushed"] = push_folder(output, options.push, info.step, tag_dir.name)
    return record


def _evaluate(folder: Path, options: ExportOptions):
    """lm-evaluation-harness on the export folder (before it is renamed into place)."""
    from pretrain.export.harness import evaluate_folder

    result = evaluate_folder(folder, list(options.eval_tasks), limit=options.eval_limit,
                             include_path=options.eval_include_path)
    log.info("lm-eval: %s", "; ".join(f"{task} " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(m.items()) if not k.endswith("_stderr"))
                                     for task, m in sorted(result.tasks.items())))
    return result


def spawn_export(checkpoint_dir: str | Path, out_dir: str | Path, extra_args: tuple[str, ...] = (),
                 log_path: str | Path | None = None) -> subprocess.Popen:
    """Start ``lmforge export CHECKPOINT OUT [extra_args]`` in a fresh process and return at once.

    For exports during training: the child runs at lower CPU priority (``nice -n 10`` where available)
    and writes its output to ``log_path`` (default ``OUT.export.log`` beside ``OUT``); poll or wait on the
    returned Popen (exit 0: verified export in ``OUT``; 2: a one-line error at the end of the log).
    """
    out_dir = Path(out_dir)
    log_path = Path(log_path) if log_path else out_dir.with_name(out_dir.name + ".export.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    cmd = [*nice, sys.executable, "-m", "lmforge", "export", str(checkpoint_dir), str(out_dir), *extra_args]
    with open(log_path, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
