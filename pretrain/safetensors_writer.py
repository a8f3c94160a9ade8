"""Sharded safetensors written tensor by tensor, so memory holds one tensor, not one shard.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (a 5 GB shard is 5 GB
of RAM). The format is simple enough to stream: an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and ``data_offsets`` (byte range in the data section), then the
raw little-endian bytes (https://github.com/huggingface/safetensors#format). The header is computed
from shapes alone, then each tensor is produced and written in header order. Files are split with
``huggingface_hub.split_torch_state_dict_into_shards`` (the Hub's and transformers' rule: fill in
order, a new file when the next tensor would pass the limit) and indexed in
``model.safetensors.index.json`` when there is more than one.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
"""torch dtype name -> safetensors dtype tag."""
WEIGHTS_PATTERN = "model{suffix}.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, shape and dtype (torch)."""

    name: str
    shape: tuple[int, ...]
    dtype: object

    @property
    def nbytes(self) -> int:
        import torch

        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _tag(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} has no safetensors tag")
    return SAFETENSORS_DTYPES[name]


def shard_layout(specs: list[TensorSpec], max_shard_bytes: int | str) -> dict[str, list[TensorSpec]]:
    """File name -> tensors, by ``huggingface_hub``'s sharding rule (``split_state_dict_into_shards_factory``,
    what ``split_torch_state_dict_into_shards`` calls) on the specs' byte sizes. The torch front end is
    not used: its storage lookup imports torch's DTensor stack, about a second per export."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory({s.name: s for s in specs}, get_storage_size=lambda s: s.nbytes,
                                                 filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_bytes)
    by_name = {s.name: s for s in specs}
    return {fname: [by_name[n] for n in names] for fname, names in split.filename_to_tensors.items()}


def write_file(path: str | Path, specs: Iterable[TensorSpec], produce: Callable[[TensorSpec], object],
               metadata: dict[str, str] | None = None, on_tensor: Callable[[int], None] | None = None) -> int:
    """Write one safetensors file, calling ``produce(spec)`` for each tensor in turn; returns its bytes.

    Raises:
        ValueError: ``produce`` returned a tensor of another shape or dtype than its spec.
    """
    import torch

    specs = list(specs)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": _tag(s.dtype), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for s in specs:
            t = produce(s)
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise ValueError(f"{s.name}: produced {tuple(t.shape)} {t.dtype}, header says {s.shape} {s.dtype}")
            fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            if on_tensor is not None:
                on_tensor(s.nbytes)
    return 8 + len(blob) + offset


def write_sharded(out_dir: str | Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], object],
                  max_shard_bytes: int | str, n_params: int, on_tensor: Callable[[int], None] | None = None) -> list[str]:
    """Write ``specs`` as ``model.safetensors`` or, past ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json`` (metadata total_size in bytes and total_parameters). Returns the file names."""
    out_dir = Path(out_dir)
    layout = shard_layout(specs, max_shard_bytes)
    for fname, shard in layout.items():
        write_file(out_dir / fname, shard, produce, on_tensor=on_tensor)
    if len(layout) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs), "total_parameters": n_params},
                 "weight_map": {s.name: fname for fname, shard in layout.items() for s in shard}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return list(layout)
