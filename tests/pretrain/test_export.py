"""Export round trips on real checkpoints: CLM from the real trainer (ZeRO 0 on 1 rank, ZeRO 2 and 3 on 2 ranks),
MLM from lmforge's engine and save protocol (tests/pretrain/mlm_checkpoints.py), each exported by ``lmforge
export`` in its own process and verified there in a fresh one; weights compared with DeepSpeed's zero_to_fp32.

All checkpoints are trained concurrently and all exports run concurrently (a few at a time), once per module.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pretrain.checkpoint import STATE_DIGEST_KEY, STATE_FILE, state_digest
from pretrain.export.verify import LOGIT_TOLERANCE
from pretrain.integrity import DIGESTS_KEY, digest
from tests.pretrain.conftest import TINY, Ranks


def _fp16_trains_here() -> bool:
    """DeepSpeed's CPU accelerator trains fp16 only where the CPU has fp16 arithmetic (e.g. AVX512-FP16)."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


LOOSE_PRECISION = "fp16" if _fp16_trains_here() else "fp32"
"""Precision of the run exported in bf16 (a dtype it was not trained in): fp16 where this CPU trains it."""
CLM_RUNS = {  # name: (ranks, overrides)
    "clm-zero0-bf16": (1, ["deepspeed.zero_stage=0", "deepspeed.precision=bf16"]),
    "clm-zero2-fp16": (2, ["deepspeed.zero_stage=2", f"deepspeed.precision={LOOSE_PRECISION}"]),
    "clm-zero3-bf16": (2, ["deepspeed.zero_stage=3", "deepspeed.precision=bf16"]),
}
MLM_RUNS = ("0:bf16", "2:fp32", "3:bf16")
EXACT_RUNS = {"clm-zero0-bf16", "clm-zero3-bf16", "mlm-zero0-bf16", "mlm-zero2-fp32", "mlm-zero3-bf16"}
"""Exported in float32 (the default) and so verifiable bit for bit; clm-zero2-fp16 is exported in bf16."""
SHARD_BYTES = 100_000
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_dummy_token_for_tests", "HF_HUB_OFFLINE": "0"}
MAX_CONCURRENT_EXPORTS = 4
EVAL_TASKS = Path(__file__).resolve().parents[1] / "assets" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory, tokenizer_dir, corpus_dirs):
    """The session tokenizer plus a mask token, and a small dataset prepared with it."""
    from transformers import AutoTokenizer

    from data_prep.prep import PrepConfig, prepare

    root = tmp_path_factory.mktemp("mlm-data")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"mask_token": "<mask>"})
    tok.save_pretrained(str(root / "tokenizer"))
    prepare(PrepConfig(inputs=corpus_dirs[:1], tokenizer=str(root / "tokenizer"), output=str(root / "data"), seq_len=64,
                       val_fraction=0.2, show_progress=False))
    return root / "tokenizer", root / "data"


def _corrupt(tag_dir: Path, name: str) -> None:
    """Add 0.5 to every element of tensor ``name`` where the checkpoint stores its fp32 master copy."""
    from pretrain.export.consolidate import plan_checkpoint

    (plan,) = [t for t in plan_checkpoint(tag_dir).tensors if t.name == name]
    for ext in plan.extents:
        with open(ext.path, "r+b") as fh:
            fh.seek(ext.offset_bytes)
            values = torch.frombuffer(bytearray(fh.read(ext.numel * 4)), dtype=torch.float32)
            fh.seek(ext.offset_bytes)
            fh.write((values + 0.5).numpy().tobytes())
    # wrong values written at save time, not rot after it: the checkpoint's own digests match the files,
    # so it is the export's logits check, not pretrain.integrity, that must catch them
    state = json.loads((tag_dir / STATE_FILE).read_text())
    state.pop(STATE_DIGEST_KEY, None)
    state[DIGESTS_KEY].update(digest(tag_dir, sorted({os.path.relpath(ext.path, tag_dir) for ext in plan.extents})))
    (tag_dir / STATE_FILE).write_text(json.dumps({**state, STATE_DIGEST_KEY: state_digest(state)}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir, prepared_dir, mlm_data) -> dict[str, Path]:
    """name -> complete checkpoint folder, for every CLM and MLM run."""
    root = tmp_path_factory.mktemp("export-runs")
    config = root / "train.yaml"
    config.write_text(f"data:\n  path: {prepared_dir}\n  tokenizer: {tokenizer_dir}\n")
    ranks = {}
    for name, (nproc, extra) in CLM_RUNS.items():
        (root / name).mkdir()
        ranks[name] = Ranks(config, nproc, [*TINY, f"run_dir={root / name}", "max_steps=2", *extra], root / name)
    mlm_log = open(root / "mlm.log", "wb")
    mlm = subprocess.Popen([sys.executable, "-m", "tests.pretrain.mlm_checkpoints", str(root), str(mlm_data[0]),
                            str(mlm_data[1]), *MLM_RUNS], stdout=mlm_log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    for name, r in ranks.items():
        assert r.wait() == [0] * len(r.procs), (root / name / "rank0.log").read_text()[-3000:]
    assert mlm.wait(timeout=300) == 0, (root / "mlm.log").read_text()[-3000:]
    mlm_log.close()
    from pretrain.checkpoint import latest_complete

    found = {p.name: latest_complete(p / "checkpoints") for p in root.iterdir() if (p / "checkpoints").is_dir()}
    assert set(found) == {*CLM_RUNS, *(f"mlm-zero{v.replace(':', '-')}" for v in MLM_RUNS)} and all(found.values())
    return {name: tag for name, tag in found.items() if tag is not None}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, dict]:
    """name -> {"out", "rc", "stderr", "log"} of each ``lmforge export`` (run concurrently)."""
    from pretrain.export.core import spawn_export

    out = tmp_path_factory.mktemp("exports")
    bad_run = out / "corrupted-run"
    shutil.copytree(runs["clm-zero3-bf16"].parent.parent, bad_run, ignore=shutil.ignore_patterns("rank*.log"))
    _corrupt(bad_run / "checkpoints" / runs["clm-zero3-bf16"].name, "model.layers.0.self_attn.q_proj.weight")
    jobs: dict[str, tuple[list[str], dict[str, str]]] = {name: ([str(tag)], {}) for name, tag in runs.items()}
    jobs["clm-zero0-bf16"] = ([str(runs["clm-zero0-bf16"]), "--max-shard-size", f"{SHARD_BYTES // 1000}KB"], {})
    jobs["clm-zero3-bf16"] = ([str(runs["clm-zero3-bf16"]), "--eval-tasks", "lmforge_code_mc", "--eval-limit", "4",
                               "--eval-include-path", str(EVAL_TASKS)],  # the harness on a 2-rank run's export
                              {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    jobs["clm-zero2-fp16"] = ([str(runs["clm-zero2-fp16"]), "--dtype", "bf16", "--push-to-hub", "me/tiny", "--private",
                               "--revision", "step-{step}"], UNREACHABLE)
    jobs["corrupted"] = ([str(bad_run)], {})
    pending, results = list(jobs), {}
    running: dict = {}
    while pending or running:
        while pending and len(running) < MAX_CONCURRENT_EXPORTS:
            name = pending.pop(0)
            args, env = jobs[name]
            target = out / name
            if name == "clm-zero3-bf16":  # the non-blocking entry point the trainer uses for export_every
                with mock.patch.dict(os.environ, env):  # its child inherits this environment
                    proc = spawn_export(args[0], target, tuple(args[1:]))
            else:
                log = open(out / f"{name}.export.log", "wb")
                proc = subprocess.Popen([sys.executable, "-m", "lmforge", "export", args[0], str(target), *args[1:]],
                                        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
                log.close()
            running[name] = (proc, time.monotonic())
        for name, (proc, started) in list(running.items()):
            if proc.poll() is not None or time.monotonic() - started > 300:
                rc = proc.poll()
                if rc is None:
                    proc.kill()
                log = (out / f"{name}.export.log").read_text()
                results[name] = {"out": out / name, "rc": rc, "log": log,
                                 "errors": [line for line in log.splitlines() if line.startswith("lmforge")]}
                del running[name]
        time.sleep(0.2)
    return results


def _ok(exports, name) -> Path:
    r = exports[name]
    assert r["rc"] == 0, r["log"][-3000:]
    return r["out"]


def _reference_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The master weights as DeepSpeed's zero_to_fp32 gives them; for stage 0, the module (fp32 training) or
    its fp32 master copies, which the module's bf16/fp16 weights must equal after casting."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(tag_dir.glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(out.glob("model*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.mark.parametrize("name", [*CLM_RUNS, *(f"mlm-zero{v.replace(':', '-')}" for v in MLM_RUNS)])
def test_round_trip_reproduces_the_trained_model(exports, runs, name):
    out = exports[name]["out"]
    assert (out / "lmforge_export.json").is_file(), exports[name]["log"][-3000:]
    record = json.loads((out / "lmforge_export.json").read_text())
    assert record["verified"] and record["step"] == json.loads((runs[name] / "lmforge_state.json").read_text())["step"]
    v = record["verification"]
    if name in EXACT_RUNS:  # same weights, dtype, inputs and CPU threads as the engine: bit-identical logits
        assert v["exact"] and v["max_abs_logit_diff"] == 0.0 and v["tolerance"] == {"rtol": 0.0, "atol": 0.0}, v
    else:  # trained in fp16 (fp32 on a CPU without fp16), exported in bf16: the tolerance of the looser dtype
        assert not v["exact"] and f"exported in bf16, trained in {LOOSE_PRECISION}" in v["inexact_reason"], v
        assert v["tolerance"] == dict(zip(("rtol", "atol"), LOGIT_TOLERANCE["bf16"])) and 0 < v["max_abs_logit_diff"]
    mlm = name.startswith("mlm")
    assert v["pipeline"] == ("fill-mask" if mlm else "text-generation")
    assert len(v["fill_mask"]) == 3 if mlm else isinstance(v["continuation"], str)
    weights, reference = _weights(out), _reference_weights(runs[name])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[record["dtype"]]
    tied = set(record["tied"])
    assert set(weights) == set(reference) - tied
    assert tied == ({"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} if mlm else set())
    for key, ref in reference.items():
        if key in tied:
            continue
        if ref.dtype == torch.float32:
            assert torch.equal(weights[key], ref.to(dtype)), key
        else:  # stage-0 mixed precision: the module holds the low-precision copy of the exported master weights
            assert torch.equal(weights[key].to(ref.dtype), ref), key
    config = json.loads((out / "config.json").read_text())
    embedding = weights["bert.embeddings.word_embeddings.weight" if mlm else "model.embed_tokens.weight"]
    assert config["architectures"] == (["BertForMaskedLM"] if mlm else ["LlamaForCausalLM"])
    assert config["vocab_size"] == embedding.shape[0] and config["torch_dtype"] == str(dtype).removeprefix("torch.")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    recorded = runs[name].parent.parent / "model"  # written by the trainer where the model existed (pretrain.model_files)
    assert (out / "generation_config.json").read_bytes() == (recorded / "generation_config.json").read_bytes()
    state = json.loads((runs[name] / "lmforge_state.json").read_text())
    assert hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest() == state["fingerprints"]["tokenizer"]


def test_checkpoint_structure_is_read_without_torch_as_torch_reads_it(runs):
    """Every tensor of every DeepSpeed file of every run: same shape, stride, dtype and data offset as torch.load
    gives on the meta device; DeepSpeed's own objects (enums, loss scalers) are stand-ins, ints where needed."""
    from pretrain.export.torch_archive import TensorRef, load_structure

    def walk(ours, theirs, where: str) -> int:
        if isinstance(theirs, torch.Tensor):
            assert isinstance(ours, TensorRef) and ours.shape == tuple(theirs.shape), where
            assert (ours.stride, ours.storage_offset, ours.dtype) == (
                theirs.stride(), theirs.storage_offset(), str(theirs.dtype).removeprefix("torch.")), where
            assert ours.storage.data_offset == theirs.untyped_storage()._checkpoint_offset, where
            return 1
        if isinstance(theirs, dict) and not isinstance(ours, dict):
            raise AssertionError(f"{where}: {ours!r}")
        if isinstance(theirs, dict):
            return sum(walk(ours[k], v, f"{where}.{k}") for k, v in theirs.items())
        if isinstance(theirs, (list, tuple)):
            return sum(walk(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(ours, theirs, strict=True)))
        return 0

    for name, tag_dir in runs.items():
        for path in sorted(tag_dir.glob("*_states.pt")):
            ours = load_structure(path)
            assert walk(ours, torch.load(path, map_location="meta", weights_only=False), f"{name}/{path.name}") > 0
            if "optimizer_state_dict" in ours:
                assert int(ours["optimizer_state_dict"]["zero_stage"]) == int(name.split("zero")[1][0])


def test_export_in_the_background_for_the_trainer(exports):
    """spawn_export returned at once and its child wrote a verified export and a log."""
    assert exports["clm-zero3-bf16"]["rc"] == 0 and "export complete" in exports["clm-zero3-bf16"]["log"]


def test_pipelines_load_the_exported_folders(exports):
    from transformers import pipeline

    torch.manual_seed(0)
    generated = pipeline("text-generation", model=str(_ok(exports, "clm-zero3-bf16")))(
        "def f(x):", max_new_tokens=5, do_sample=False, return_full_text=False)
    assert generated[0]["generated_text"]
    fill = pipeline("fill-mask", model=str(_ok(exports, "mlm-zero3-bf16")))
    results = fill(f"import json{fill.tokenizer.mask_token}", top_k=4)
    assert len(results) == 4 and all(r["token_str"] is not None and 0 <= r["score"] <= 1 for r in results)


def test_sharded_output_has_an_index(exports):
    out = _ok(exports, "clm-zero0-bf16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    weights = _weights(out)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    for path in shards:
        held = [k for k, f in index["weight_map"].items() if f == path.name]
        assert path.stat().st_size <= SHARD_BYTES + 1000 or len(held) == 1, (path.name, held)


def test_model_card_validates_and_reports_the_run(exports, runs):
    from huggingface_hub import ModelCard

    for name, task in (("clm-zero3-bf16", "text-generation"), ("mlm-zero3-bf16", "fill-mask")):
        out = _ok(exports, name)
        card = ModelCard((out / "README.md").read_text())
        data = card.data.to_dict()
        assert data["library_name"] == "transformers" and data["pipeline_tag"] == task
        assert data["license"] and data["language"] and data["datasets"] and "lmforge" in data["tags"]
        records = [json.loads(line) for line in (runs[name].parent.parent / "metrics.jsonl").read_text().splitlines()]
        last_val = [r for r in records if "val_ppl" in r][-1]
        (result,) = [r for r in card.data.eval_results if r.metric_type == "perplexity"]  # zero3's also has the harness's
        assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(last_val["val_ppl"], rel=1e-5)
        state = json.loads((runs[name] / "lmforge_state.json").read_text())
        data_dir = Path(yaml.safe_load(state["config_yaml"])["data"]["path"])
        manifest_tokens = json.loads((data_dir / "manifest.json").read_text())["counts"]["tokens"]
        for text in ("## Model", "## Tokenizer", state["fingerprints"]["tokenizer"], "## Training data",
                     f"{manifest_tokens:,} tokens", "mixing weights", f"tokens seen: {state['tokens']:,}", "global batch",
                     "schedule: cosine", "precision: bf16", "ZeRO stage 3", f"hardware: {state['hardware']}",
                     "wall time", "MFU", "## Evaluation", "loss_curve.png", "## Intended use and limitations",
                     "## How to load"):
            assert text in card.text, (name, text)
        assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verification_catches_a_corrupted_tensor(exports):
    r = exports["corrupted"]
    assert r["rc"] == 2 and len(r["errors"]) == 1, r["log"][-3000:]
    line = r["errors"][0]
    assert line.startswith("lmforge: error: verification in a fresh process failed:")
    diff = float(line.split("differ from the trained model's by up to ")[1].split(" ")[0])
    assert diff > 0.1, line
    assert not r["out"].exists() and (r["out"].parent / "corrupted.tmp" / "model.safetensors").is_file()


def test_push_to_an_unreachable_endpoint_fails_cleanly(exports):
    r = exports["clm-zero2-fp16"]
    assert r["rc"] == 2 and len(r["errors"]) == 1, r["log"][-3000:]
    assert "Traceback" not in r["log"]
    line = r["errors"][0]
    assert "push of" in line and "http://127.0.0.1:9/me/tiny@step-2" in line and "complete and unchanged" in line
    record = json.loads((r["out"] / "lmforge_export.json").read_text())  # the local export is there and verified
    assert record["verified"] and record["dtype"] == "bf16"


def test_bad_input_is_one_line_naming_the_problem(runs, tmp_path):
    from pretrain.errors import ExportError
    from pretrain.export.consolidate import plan_checkpoint
    from pretrain.export.core import ExportOptions, export
    from pretrain.export.hub import PushOptions

    with pytest.raises(ExportError, match="--dtype 'int8'.*--max-shard-size 'lots'.*--push-to-hub 'noslash'"):
        export(runs["clm-zero3-bf16"], tmp_path / "x", ExportOptions(dtype="int8", max_shard_size="lots",
                                                                     push=PushOptions(repo_id="noslash")))
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export(runs["clm-zero3-bf16"], tmp_path / "exists")
    with pytest.raises(ExportError, match="not a complete checkpoint"):
        export(tmp_path / "exists", tmp_path / "y")
    partial = tmp_path / "partial"
    shutil.copytree(runs["clm-zero3-bf16"], partial)
    next(partial.glob("*zero_pp_rank_1_*optim_states.pt")).unlink()
    with pytest.raises(ExportError, match="1 optimizer state files but the checkpoint was partitioned over 2 ranks"):
        plan_checkpoint(partial)
    proc = subprocess.run([sys.executable, "-m", "lmforge", "export", str(tmp_path / "nowhere"), str(tmp_path / "z")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"lmforge: error: {tmp_path / 'nowhere'}: checkpoint folder not found")


def test_export_eval_tasks_put_harness_results_in_the_model_index(exports):
    """--eval-tasks: lm-evaluation-harness on the verified folder of a 2-rank ZeRO-3 run, figures in the card's
    model-index and body."""
    from huggingface_hub import ModelCard

    out = _ok(exports, "clm-zero3-bf16")
    record = json.loads((out / "lmforge_export.json").read_text())
    evaluation = record["evaluation"]
    assert evaluation["samples"] == {"lmforge_code_mc": 4} and evaluation["limit"] == 4
    acc = evaluation["tasks"]["lmforge_code_mc"]["acc"]
    card = ModelCard.load(out / "README.md")
    results = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    assert results[("lmforge_code_mc", "acc")].metric_value == round(acc, 4) and acc in (0, 0.25, 0.5, 0.75, 1)
    assert "lm-eval 0.4" in results[("lmforge_code_mc", "acc")].metric_name
    assert any(r.metric_type == "perplexity" for r in card.data.eval_results)  # the validation figure stays
    assert "| lmforge_code_mc | acc |" in card.text
