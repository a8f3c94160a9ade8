"""The export's parts on small real inputs, in-process: torch.save structure without torch, the kernel and
buffered copies, the streaming safetensors writer, the transformers files written without transformers, and
when verification must be bit-exact. (Round trips of real checkpoints: test_export.py.)"""
from __future__ import annotations

import enum
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.export.consolidate import Extent, TensorPlan, TensorReader
from pretrain.errors import ExportError
from pretrain.export.safetensors_writer import TensorSpec, write_sharded
from pretrain.export.torch_archive import Opaque, TensorRef, load_structure
from pretrain.export.verify import EXACT_KEYS, inexact_reason, probe_metadata


class Stage(int, enum.Enum):  # pickled by reference, as DeepSpeed's ZeroStageEnum
    weights = 3


class Scaler:  # an arbitrary object with state, as DeepSpeed's loss scalers
    def __init__(self):
        self.cur_scale, self.history = 2.0**16, [1, 2]


def _saved(tmp_path: Path) -> tuple[Path, dict]:
    base = torch.arange(24, dtype=torch.float32)
    obj = {"flat": [base, base[6:18].view(3, 4)],  # one storage, the second tensor at element offset 6
           "param": torch.nn.Parameter(torch.randn(2, 5)), "bf16": torch.randn(7).to(torch.bfloat16),
           "ids": torch.tensor([[1, 2], [3, 4]]), "transposed": torch.randn(3, 2).t(),
           "shapes": OrderedDict(w=torch.Size([3, 4])), "stage": Stage.weights, "scaler": Scaler(),
           "dtype": torch.float16, "device": torch.device("cpu"), "nested": {"set": {1, 2}, "bytes": b"\x00\xff"}}
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    return path, obj


def test_structure_without_torch_matches_torch_load(tmp_path):
    path, obj = _saved(tmp_path)
    got, meta = load_structure(path), torch.load(path, map_location="meta", weights_only=False)

    def same(ref: TensorRef, t: torch.Tensor) -> None:
        assert (ref.shape, ref.stride, ref.storage_offset) == (tuple(t.shape), t.stride(), t.storage_offset())
        assert ref.dtype == str(t.dtype).removeprefix("torch.")
        assert ref.storage.data_offset == t.untyped_storage()._checkpoint_offset

    for key in ("param", "bf16", "ids", "transposed"):
        same(got[key], meta[key])
    for ref, t in zip(got["flat"], meta["flat"]):
        same(ref, t)
    assert got["flat"][0].storage == got["flat"][1].storage and got["flat"][1].byte_offset == got["flat"][0].byte_offset + 24
    assert got["transposed"].is_contiguous is False and got["flat"][1].is_contiguous
    raw = path.read_bytes()  # the offsets point at the tensors' bytes
    for key in ("param", "bf16", "ids"):
        ref = got[key]
        assert raw[ref.byte_offset:ref.byte_offset + ref.numel * ref.itemsize] == obj[key].detach().numpy().tobytes() \
            if key != "bf16" else raw[ref.byte_offset:ref.byte_offset + 14] == obj[key].view(torch.int16).numpy().tobytes()
    assert got["shapes"] == OrderedDict(w=(3, 4)) and int(got["stage"]) == 3 and got["dtype"] == "torch.float16"
    assert isinstance(got["scaler"], Opaque) and got["scaler"].state == {"cur_scale": 2.0**16, "history": [1, 2]}
    assert got["nested"] == {"set": {1, 2}, "bytes": b"\x00\xff"} and isinstance(got["device"], Opaque)


def test_unreadable_files_are_one_clear_error(tmp_path):
    path, _ = _saved(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"cut\.pt: cannot read DeepSpeed checkpoint file \(BadZipFile"):
        load_structure(cut)
    (tmp_path / "legacy.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ExportError, match="legacy.pt: cannot read"):
        load_structure(tmp_path / "legacy.pt")


def test_kernel_and_buffered_copies_write_the_planned_bytes(tmp_path):
    path, obj = _saved(tmp_path)
    s = load_structure(path)
    a, b = s["flat"][1], s["param"]  # a tensor from the middle of a storage, then one from another record
    plan = TensorPlan("t", (a.numel + b.numel,), "float32", [Extent(str(path), a.byte_offset, a.numel),
                                                              Extent(str(path), b.byte_offset, b.numel)])
    expected = torch.cat([obj["flat"][1].reshape(-1), obj["param"].detach().reshape(-1)])
    outs = []
    for kernel in (True, False):
        out = tmp_path / f"out-{kernel}"
        with TensorReader() as reader, open(out, "wb") as fh:
            reader.kernel_copy = kernel
            fh.write(b"head")
            fh.flush()
            assert reader.copy(plan, fh.fileno(), 4) == expected.numel() * 4
            assert torch.equal(reader.read(plan), expected)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == b"head" + expected.numpy().tobytes()
    short = TensorPlan("t", (10**6,), "float32", [Extent(str(path), a.byte_offset, 10**6)])
    with TensorReader() as reader, open(tmp_path / "short", "wb") as fh, pytest.raises(ExportError, match="truncated"):
        reader.copy(short, fh.fileno(), 0)


def test_streamed_safetensors_load_with_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(4, 4).to(torch.bfloat16), "d": torch.ones(0)}
    specs = [TensorSpec(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()]

    def write(spec, fd, offset):
        data = tensors[spec.name].reshape(-1).view(torch.uint8).numpy().tobytes()
        import os

        return os.pwrite(fd, data, offset)

    files = write_sharded(tmp_path, specs, write, 100, n_params=0)  # [a] [b c d]: the Hub's rule fills files in order
    assert len(files) == 2 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = {k: v for f in files for k, v in load_file(str(tmp_path / f)).items()}
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], t) for k, t in tensors.items())
    with pytest.raises(ValueError, match="b: wrote 0 bytes, the header says 56"):
        write_sharded(tmp_path, specs[1:2], lambda s, fd, off: 0, 100, n_params=0)


def test_config_files_match_what_transformers_writes(tmp_path):
    from transformers import GenerationConfig
    from transformers.models.auto import modeling_auto

    from pretrain.export.hf_config import MAPPINGS, _mapping_from_source, architecture, generation_config, write_json

    for objective, name in MAPPINGS.items():
        assert _mapping_from_source(name) == dict(getattr(modeling_auto, name)), objective
    assert (architecture("llama", "clm"), architecture("bert", "mlm")) == ("LlamaForCausalLM", "BertForMaskedLM")
    with pytest.raises(ExportError, match="model_type 'llama' has no transformers MLM class"):
        architecture("llama", "mlm")
    for ids in ((0, 0, 1), (None, 2, 2)):
        GenerationConfig(bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2]).save_pretrained(str(tmp_path))
        theirs = (tmp_path / "generation_config.json").read_text()
        write_json(tmp_path / "generation_config.json", generation_config(*ids))
        assert (tmp_path / "generation_config.json").read_text() == theirs


def test_exact_verification_where_the_reload_computes_what_the_engine_did():
    here = probe_metadata("bf16", "cpu")
    assert set(EXACT_KEYS) <= set(here) and here["linear"] == "torch"
    assert inexact_reason(here, "fp32") is None and inexact_reason(here, "bf16") is None
    assert inexact_reason({**here, "linear": "deepspeed.runtime.zero.linear.zero3_linear_wrap"}, "bf16") is None
    assert "exported in fp16, trained in bf16" in inexact_reason(here, "fp16")
    assert "exported in bf16, trained in fp32" in inexact_reason({**here, "precision": "fp32"}, "bf16")
    assert "device cuda" in inexact_reason({**here, "device": "cuda"}, "fp32")
    assert "does not record" in inexact_reason({"precision": "bf16"}, "fp32")
    assert "replaced by mylib.linear" in inexact_reason({**here, "linear": "mylib.linear"}, "fp32")
    assert json.loads(json.dumps(here)) == here and all(isinstance(v, str) for v in here.values())
