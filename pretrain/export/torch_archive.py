"""The structure of a ``torch.save`` file without torch: its Python objects, with every tensor replaced
by a :class:`TensorRef` (dtype, shape, stride and the byte offset of its data in the file); no tensor
data is read.

``torch.save`` writes an uncompressed zip archive (torch/serialization.py, ``_save`` / ``_load``):
``<archive>/data.pkl`` is the pickled object, in which each storage is a persistent id
``("storage", torch.<Type>Storage, key, location, numel)`` and each tensor a call
``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)``; the record
``<archive>/data/<key>`` holds that storage's raw little-endian bytes. :func:`load_structure`
unpickles ``data.pkl`` with the storage types, dtypes and rebuild functions mapped to plain Python,
a few safe builtins (containers, ``OrderedDict``, ``codecs.encode``, ``copyreg._reconstructor``) allowed,
and every other global (DeepSpeed's enums and loss scalers, ``torch.device``, numpy) replaced by an
inert :class:`Opaque` stand-in that keeps the arguments it was built from. So reading a checkpoint's
layout imports neither torch nor DeepSpeed (about 1.5 s of imports per export) and runs no code from
the file, unlike ``torch.load(weights_only=False)``.

A record's data offset is read from its zip local header, as torch's own ``get_record_offset``
(``UntypedStorage._checkpoint_offset`` under ``torch.load(map_location="meta")``); tests check the two agree.
"""
from __future__ import annotations

import _compat_pickle
import builtins
import codecs
import collections
import copyreg
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.errors import ExportError

ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "complex128": 16, "complex64": 8, "int64": 8,
            "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
"""torch dtype name -> bytes per element."""
FLOAT_DTYPES = frozenset({"float64", "float32", "bfloat16", "float16"})
STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "BFloat16Storage": "bfloat16",
                  "HalfStorage": "float16", "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
                  "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
                  "ByteStorage": "uint8", "BoolStorage": "bool", "UntypedStorage": "uint8"}
"""``torch.<Type>Storage`` class pickled in a persistent id -> the dtype of its elements (torch.storage)."""
SAFE_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): codecs.encode,
                ("torch", "Size"): tuple,
                **{("builtins", n): getattr(builtins, n) for n in ("set", "frozenset", "list", "dict", "tuple", "slice",
                                                                     "complex", "bytearray", "bytes", "int", "float",
                                                                     "str", "bool", "object")}}
LOCAL_HEADER = struct.Struct("<4s22xHH")
"""Zip local file header: signature, 22 bytes, file name length, extra field length (30 bytes)."""


@dataclass(frozen=True)
class StorageRef:
    """One storage record of the archive: ``numel`` elements of ``dtype`` from byte ``data_offset`` of the file."""

    key: str
    dtype: str
    numel: int
    data_offset: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor of a ``torch.save`` file, as its pickle describes it; ``storage_offset`` and ``stride`` in elements."""

    path: str
    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        """torch dtype name (``float32``, ``bfloat16``, ...)."""
        return self.storage.dtype

    @property
    def itemsize(self) -> int:
        if self.dtype not in ITEMSIZE:
            raise ExportError(f"{self.path}: tensor of unsupported dtype {self.dtype}")
        return ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_contiguous(self) -> bool:
        expected, size = [], 1
        for n in reversed(self.shape):
            expected.append(size)
            size *= n
        return all(s == e for n, s, e in zip(self.shape, self.stride, reversed(expected)) if n != 1)

    @property
    def byte_offset(self) -> int:
        """Byte offset of the tensor's first element in the file."""
        return self.storage.data_offset + self.storage_offset * self.itemsize


class Opaque(dict):
    """Stand-in for an object of a class :func:`load_structure` does not import.

    Keeps the arguments it was called with (``args``), its pickled state (``state``) and anything
    appended to it (``items``); dict items land in the dict itself. ``int()`` gives the value of an
    enum member (pickled as ``Class(value)``).
    """

    qualname = "?"
    args: tuple
    state: Any
    items: list  # type: ignore[assignment]  # shadows dict.items on purpose: the pickle's APPEND target

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state) -> None:
        self.state = state

    def append(self, item) -> None:
        self.items.append(item)

    def extend(self, items) -> None:
        self.items.extend(items)

    def __int__(self) -> int:
        if len(self.args) == 1 and isinstance(self.args[0], int):
            return self.args[0]
        raise TypeError(f"{self!r} has no integer value")

    __index__ = __int__

    def __repr__(self) -> str:
        return f"<{self.qualname}{self.args!r}>"

    __hash__ = object.__hash__  # type: ignore[assignment]


def _rebuild_parameter(data, *rest):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (pickle protocols 0 and 1), building stand-ins as ``cls(state)``."""
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls(state)
    return copyreg._reconstructor(cls, base, state)  # type: ignore[attr-defined]  # absent from typeshed


TENSOR_REBUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}
"""Called as ``f(storage, storage_offset, size, stride, ...)``; made :class:`TensorRef`."""
REBUILD = {("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
           ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
           ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type, ("copyreg", "_reconstructor"): _reconstructor}
"""Other globals mapped to plain functions: parameters and tensor subclasses become their tensor."""


class _StorageType:
    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES.get(name, f"unsupported ({name})")


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: _Archive):
        import io

        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        key = _compat_pickle.NAME_MAPPING.get((module, name)) or (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
        module, name = key  # protocol 2 names Python 2 modules (__builtin__, copy_reg), as pickle's own find_class maps
        if key in SAFE_GLOBALS:
            return SAFE_GLOBALS[key]
        if key in TENSOR_REBUILDERS:
            return self.archive.tensor
        if key in REBUILD:
            return REBUILD[key]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch" and name in ITEMSIZE:
            return f"torch.{name}"  # a dtype object in the pickle (e.g. in a config): its name
        if key not in self.stubs:
            self.stubs[key] = type(name, (Opaque,), {"qualname": f"{module}.{name}"})
        return self.stubs[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else f"unsupported ({storage_type!r})"
        return self.archive.storage(str(key), dtype, int(numel))


class _Archive:
    """The zip records of one torch.save file, and the storages its pickle references."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, fh):
        self.path, self.zf, self.fh = path, zf, fh
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ExportError(f"{path}: not a torch.save archive (found {len(pkl)} */data.pkl records)")
        self.prefix = pkl[0][:-len("data.pkl")]
        order = zf.NameToInfo.get(self.prefix + "byteorder")
        if order is not None and zf.read(order) != b"little":
            raise ExportError(f"{path}: saved {zf.read(order).decode()}-endian; only little-endian checkpoints are read")
        self.storages: dict[str, StorageRef] = {}

    def storage(self, key: str, dtype: str, numel: int) -> StorageRef:
        if key not in self.storages:
            info = self.zf.NameToInfo.get(f"{self.prefix}data/{key}")
            if info is None:
                raise ExportError(f"{self.path}: storage record data/{key} is missing")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ExportError(f"{self.path}: storage record data/{key} is compressed; torch writes them stored")
            nbytes = numel * ITEMSIZE.get(dtype, 0)
            if dtype in ITEMSIZE and info.file_size != nbytes:
                raise ExportError(f"{self.path}: storage data/{key} holds {info.file_size} bytes, its pickle says "
                                  f"{numel} x {dtype} = {nbytes}")
            self.fh.seek(info.header_offset)
            sig, name_len, extra_len = LOCAL_HEADER.unpack(self.fh.read(LOCAL_HEADER.size))
            if sig != b"PK\x03\x04":
                raise ExportError(f"{self.path}: bad zip local header of data/{key} at byte {info.header_offset}")
            offset = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
            self.storages[key] = StorageRef(key, dtype, numel, offset)
        return self.storages[key]

    def tensor(self, storage: StorageRef, storage_offset: int, shape: tuple, stride: tuple, *rest) -> TensorRef:
        """``torch._utils._rebuild_tensor_v2``'s arguments (requires_grad, hooks and metadata ignored) -> TensorRef."""
        if not isinstance(storage, StorageRef):
            raise ExportError(f"{self.path}: a tensor rebuilt from {storage!r}, not a storage record")
        ref = TensorRef(str(self.path), storage, int(storage_offset), tuple(int(n) for n in shape),
                        tuple(int(s) for s in stride))
        if ref.numel and storage_offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) >= storage.numel:
            raise ExportError(f"{self.path}: a tensor of shape {ref.shape} at element {storage_offset} runs past its "
                              f"storage of {storage.numel}")
        return ref


def load_structure(path: str | Path):
    """The object ``torch.save`` stored in ``path``, tensors as :class:`TensorRef`, unknown classes as :class:`Opaque`.

    Raises:
        ExportError: not a readable torch zip archive (truncated, legacy format, compressed or
            big-endian records, a storage record missing or of the wrong size).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            archive = _Archive(path, zf, fh)
            return _Unpickler(zf.read(archive.prefix + "data.pkl"), archive).load()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError, pickle.UnpicklingError) as exc:
        raise ExportError(f"{path}: cannot read DeepSpeed checkpoint file ({type(exc).__name__}: {exc})") from exc
