"""Sharded safetensors written tensor by tensor, so memory holds one tensor, not one shard.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (a 5 GB shard is 5 GB
of RAM). The format is simple enough to stream: an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and ``data_offsets`` (byte range in the data section), then the
raw little-endian bytes (https://github.com/huggingface/safetensors#format). The header is computed
from shapes alone, then a callback writes each tensor's bytes at its offset in the open file (the
export copies them there inside the kernel, or casts and writes them). No torch needed. Files are split with
``huggingface_hub.split_state_dict_into_shards_factory`` (public; the Hub's and transformers' rule: fill in
order, a new file when the next tensor would pass the limit) and indexed in
``model.safetensors.index.json`` when there is more than one.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from pretrain.export.torch_archive import ITEMSIZE

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
"""torch dtype name -> safetensors dtype tag."""
WriteTensor = Callable[["TensorSpec", int, int], int]
"""``write(spec, fd, offset)``: write the tensor's ``spec.nbytes`` bytes to the open file ``fd`` from byte
``offset``; returns the bytes written."""
WEIGHTS_PATTERN = "model{suffix}.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, shape and torch dtype name (``float32``, ``bfloat16``, ...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self):
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.name}: dtype {self.dtype} has no safetensors tag")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def shard_layout(specs: list[TensorSpec], max_shard_bytes: int | str) -> dict[str, list[TensorSpec]]:
    """File name -> tensors, by ``huggingface_hub``'s sharding rule (``split_state_dict_into_shards_factory``,
    what ``split_torch_state_dict_into_shards`` calls) on the specs' byte sizes. The torch front end is
    not used: the specs are not tensors, and its storage lookup imports torch's DTensor stack (about a second)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory({s.name: s for s in specs}, get_storage_size=lambda s: s.nbytes,
                                                 filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_bytes)
    by_name = {s.name: s for s in specs}
    return {fname: [by_name[n] for n in names] for fname, names in split.filename_to_tensors.items()}


def write_file(path: str | Path, specs: Iterable[TensorSpec], write: WriteTensor,
               metadata: dict[str, str] | None = None, on_tensor: Callable[[int], None] | None = None) -> int:
    """Write one safetensors file: the header, then ``write(spec, fd, offset)`` for each tensor in header
    order; returns the file's bytes.

    Raises:
        ValueError: ``write`` wrote another number of bytes than its spec's.
    """
    specs = list(specs)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    start = 8 + len(blob)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        head = struct.pack("<Q", len(blob)) + blob
        if os.write(fd, head) != len(head):
            raise OSError(f"{path}: short write of the header")
        for s in specs:
            begin = start + int(header[s.name]["data_offsets"][0])
            written = write(s, fd, begin)
            if written != s.nbytes:
                raise ValueError(f"{s.name}: wrote {written} bytes, the header says {s.nbytes} ({s.shape} {s.dtype})")
            if on_tensor is not None:
                on_tensor(s.nbytes)
    finally:
        os.close(fd)
    return start + offset


def write_sharded(out_dir: str | Path, specs: list[TensorSpec], write: WriteTensor, max_shard_bytes: int | str,
                  n_params: int, on_tensor: Callable[[int], None] | None = None) -> list[str]:
    """Write ``specs`` as ``model.safetensors`` or, past ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json`` (metadata total_size in bytes and total_parameters). Returns the file names."""
    out_dir = Path(out_dir)
    layout = shard_layout(specs, max_shard_bytes)
    for fname, shard in layout.items():
        write_file(out_dir / fname, shard, write, on_tensor=on_tensor)
    if len(layout) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs), "total_parameters": n_params},
                 "weight_map": {s.name: fname for fname, shard in layout.items() for s in shard}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return list(layout)
