"""Streaming consolidation of DeepSpeed ZeRO checkpoints (stages 0-3, any world size) into full tensors.

Every checkpoint file is read with torch's own loader, ``torch.load(path, mmap=True, weights_only=True)``,
with the DeepSpeed classes its pickle names (loss scaler, ZeRO stage enum, fragment addresses:
:func:`deepspeed_safe_globals`) allow-listed through ``torch.serialization.safe_globals``; no other code
from the file runs. With ``mmap=True`` every tensor is a view of the file's pages mapped into memory, so
loading reads the pickle only. A :class:`TensorPlan` lists the views (slices of the partitions) that make
up one full tensor; :class:`TensorWriter` writes them, one tensor at a time, into the output file and then
drops the pages it touched from this process (``madvise(MADV_DONTNEED)``; the file and the page cache
keep them), so resident memory holds at most one tensor's pages, never a second copy of the model, and
the Adam moments that share the files are never read. (DeepSpeed's ``zero_to_fp32`` maps the files the
same way but concatenates each group's partitions: a full copy of every group for stages 1-2.)

Where the fp32 master weights are (DeepSpeed 0.16-0.19; data parallel only, no tensor or pipeline
parallelism)::

    stage 0, fp32        mp_rank_00_model_states.pt["module"]: the full weights
    stage 0, bf16/fp16   mp_rank_00_model_states.pt["optimizer"]["fp32_groups"][g][i]: parameter i of
                         AdamW group g (pretrain.engine.optimizer_group), or ["fp32_groups_flat"][g]
    stage 1, 2           *zero_pp_rank_{r}_mp_rank_00_optim_states.pt["optimizer_state_dict"]
                         ["single_partition_of_fp32_groups"][g]: rank r's equal slice of group g's
                         flat vector, whose parameters follow param_shapes[g] (+ alignment paddings)
    stage 3              ...["fp32_flat_groups"][g]: each parameter split into world-size parts (the
                         last padded); rank r holds part r of each, one after another over its groups

The layouts are those DeepSpeed's own ``deepspeed/utils/zero_to_fp32.py`` reconstructs; the
alignment checks below are its checks.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os
import pickle
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from pretrain.errors import ExportError

log = logging.getLogger(__name__)

MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
OPTIM_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
ZERO3_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes a ZeRO checkpoint pickles besides tensors and containers (DeepSpeed 0.16-0.19:
    the loss scaler's class, ``ZeroStageEnum``, the bf16 optimizer's ``fragment_address``), for
    ``torch.serialization.safe_globals``; found with ``torch.serialization.get_unsafe_globals_in_checkpoint``
    on checkpoints of every stage and precision. Importing them imports DeepSpeed (about 1 s)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_mapped(path: str | Path, safe_globals: list | None = None):
    """The object ``torch.save`` stored in ``path``, every tensor a CPU view of the file's pages
    (``torch.load(mmap=True, weights_only=True)``, the classes of :func:`deepspeed_safe_globals` allowed).

    Raises:
        ExportError: not a readable torch zip archive (truncated, legacy format), or its pickle names a
            class outside the allow-list (the message names it).
    """
    safe_globals = deepspeed_safe_globals() if safe_globals is None else safe_globals
    try:
        with torch.serialization.safe_globals(safe_globals):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line),
                      str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        raise ExportError(f"{path}: cannot read DeepSpeed checkpoint file ({type(exc).__name__}: {reason})") from exc


@dataclass(frozen=True)
class Extent:
    """A contiguous run of elements of one tensor inside one checkpoint file."""

    path: str
    """The checkpoint file the elements are mapped from."""
    data: torch.Tensor
    """The run's elements: a 1-D view of the file's mapped pages (:func:`load_mapped`)."""
    offset_bytes: int | None = None
    """Byte offset of the first element in ``path`` (:func:`file_offset`); None where it could not be located."""

    @property
    def numel(self) -> int:
        return self.data.numel()


@dataclass
class TensorPlan:
    """Where the elements of one full tensor lie, in row-major order."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    """dtype on disk (float32 for master weights; a buffer keeps its training dtype)."""
    extents: list[Extent]
    is_buffer: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class CheckpointPlan:
    """Every tensor of a consolidated checkpoint, each once, and how tied names map onto them."""

    tag_dir: Path
    zero_stage: int
    world_size: int
    """Data-parallel ranks the checkpoint was saved with (1 for stage 0, whose ranks hold copies)."""
    tensors: list[TensorPlan]
    aliases: dict[str, str] = field(default_factory=dict)
    """Tied parameter name -> the name in ``tensors`` it shares storage with (not written again)."""

    @property
    def n_params(self) -> int:
        """Parameters (elements), tied ones counted once, buffers excluded."""
        return sum(t.numel for t in self.tensors if not t.is_buffer)


def _extent(path: Path, t, start: int = 0, numel: int | None = None) -> Extent:
    """Elements ``start .. start + numel`` of the flattened tensor ``t`` (loaded from ``path``)."""
    if not isinstance(t, torch.Tensor):
        raise ExportError(f"{path}: expected a tensor where the checkpoint holds {t!r}")
    if not t.is_contiguous():
        raise ExportError(f"{path}: a tensor of shape {tuple(t.shape)} is not stored contiguously; cannot stream it")
    numel = t.numel() - start if numel is None else numel
    if start < 0 or start + numel > t.numel():
        raise ExportError(f"{path}: elements {start}..{start + numel} are outside a tensor of {t.numel()}")
    data = t.detach().reshape(-1)[start:start + numel]  # saved parameters may require grad
    return Extent(str(path), data, file_offset(path, data))


MAPS_FILE = "/proc/self/maps"
"""The kernel's table of this process's memory mappings (proc(5)): ``start-end perms offset dev inode path``."""
_mapped_ranges: dict[str, list[tuple[int, int, int]]] = {}
"""Real path -> (start address, end address, file offset) of its mappings, as last read from :data:`MAPS_FILE`."""
_checked: dict[tuple[str, int], bool] = {}
"""(real path, mapping start) -> whether a tensor's first bytes read from the file at its computed offset matched."""


def _read_maps() -> None:
    _mapped_ranges.clear()
    with open(MAPS_FILE, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                _mapped_ranges.setdefault(fields[5].rstrip("\n"), []).append((lo, hi, int(fields[2], 16)))


def file_offset(path: str | Path, t: torch.Tensor) -> int | None:
    """Byte offset in ``path`` of the first element of ``t``, a view of a mapping of that file (:func:`load_mapped`),
    from the kernel's mapping table (:data:`MAPS_FILE`): address - mapping start + mapping offset. Checked by
    reading a tensor's first bytes back from the file, once per mapping; None where there is no such table (not Linux), ``t`` is not in a
    mapping of ``path``, or the bytes differ (a byte-swapped or modified page), so the caller writes from memory.
    """
    if t.numel() == 0 or not os.path.exists(MAPS_FILE):
        return None
    real, ptr = os.path.realpath(path), t.data_ptr()
    if not any(lo <= ptr < hi for lo, hi, _ in _mapped_ranges.get(real, [])):
        _read_maps()  # a mapping made since the table was last read
    for lo, hi, offset in _mapped_ranges.get(real, []):
        if lo <= ptr < hi:
            found = ptr - lo + offset
            if (real, lo) not in _checked:  # once per mapping: reading through it maps a whole folio (up to 2 MiB)
                head = t[:max(1, 16 // t.element_size())]
                with open(real, "rb", buffering=0) as fh:
                    _checked[(real, lo)] = os.pread(fh.fileno(), head.numel() * t.element_size(), found) == _bytes(head)
            return found if _checked[(real, lo)] else None
    return None


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _flat_extents(path: Path, groups: list, start: int, numel: int) -> list[Extent]:
    """Elements ``start .. start + numel`` of the concatenation of the 1-D tensors ``groups``."""
    out, group_start = [], 0
    end = start + numel
    for t in groups:
        group_end = group_start + t.numel()
        lo, hi = max(start, group_start), min(end, group_end)
        if lo < hi:
            out.append(_extent(path, t, lo - group_start, hi - lo))
        group_start = group_end
    if sum(e.numel for e in out) != numel:
        raise ExportError(f"{path}: flat groups hold {group_start} elements, need {start}..{end}")
    return out


def _ceil_to(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)


def plan_checkpoint(tag_dir: str | Path) -> CheckpointPlan:
    """Read the structure of DeepSpeed checkpoint folder ``tag_dir`` (no tensor data).

    Raises:
        ExportError: no DeepSpeed files, missing or extra rank files, a tensor-parallel checkpoint,
            or partitions whose sizes do not match the recorded parameter shapes.
    """
    tag_dir = Path(tag_dir)
    optim = []
    for path in tag_dir.iterdir():
        m = OPTIM_RE.search(path.name)
        if m:
            optim.append((int(m.group(1)), int(m.group(2)), path))
    if not optim:
        if not (tag_dir / MODEL_STATES_FILE).is_file():
            raise ExportError(f"{tag_dir}: no DeepSpeed checkpoint files ({MODEL_STATES_FILE} or *_optim_states.pt)")
        return _plan_stage0(tag_dir)
    if any(mp != 0 for _, mp, _ in optim):
        raise ExportError(f"{tag_dir}: tensor-parallel (mp_rank > 0) checkpoint; lmforge exports data-parallel ZeRO checkpoints")
    optim.sort()
    ranks = [r for r, _, _ in optim]
    if ranks != list(range(len(ranks))):
        raise ExportError(f"{tag_dir}: optimizer states of ranks {ranks}; expected ranks 0..{len(ranks) - 1} without gaps")
    files = [p for _, _, p in optim]
    states = [load_mapped(p)["optimizer_state_dict"] for p in files]
    stage = int(states[0].get("zero_stage", -1))
    counts = states[0].get("partition_count")
    world_size = max(counts) if isinstance(counts, (list, tuple)) else int(counts)
    if world_size != len(files):
        raise ExportError(f"{tag_dir}: {len(files)} optimizer state files but the checkpoint was partitioned over "
                          f"{world_size} ranks; a rank's file is missing or left from another save")
    if stage in (1, 2):
        return _plan_zero12(tag_dir, stage, files, states)
    if stage == 3:
        return _plan_zero3(tag_dir, files, states)
    raise ExportError(f"{files[0]}: unknown ZeRO stage {stage}")


def _buffers(path: Path, module: dict, names) -> list[TensorPlan]:
    return [TensorPlan(n, tuple(module[n].shape), module[n].dtype, [_extent(path, module[n])], is_buffer=True)
            for n in names if n in module]


def _plan_zero12(tag_dir: Path, stage: int, files: list[Path], states: list[dict]) -> CheckpointPlan:
    ms_path = tag_dir / MODEL_STATES_FILE
    ms = load_mapped(ms_path)
    world_size = len(files)
    parts = [st["single_partition_of_fp32_groups"] for st in states]
    paddings = states[0].get("param_alignment_paddings")
    tensors = []
    for g, shapes in enumerate(ms["param_shapes"]):
        part_numel = parts[0][g].numel()
        if any(p[g].numel() != part_numel for p in parts):
            sizes = [p[g].numel() for p in parts]
            raise ExportError(f"{tag_dir}: group {g} partitions differ in size over ranks: {sizes}")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel, extents, pos = math.prod(shape), [], offset
            while pos < offset + numel:
                rank, local = divmod(pos, part_numel)
                if rank >= world_size:
                    raise ExportError(f"{tag_dir}: parameter {name} runs past group {g}'s {part_numel * world_size} elements")
                take = min(offset + numel - pos, part_numel - local)
                extents.append(_extent(files[rank], parts[rank][g], local, take))
                pos += take
            tensors.append(TensorPlan(name, tuple(shape), torch.float32, extents))
            offset += numel + (paddings[g][i] if paddings is not None else 0)
        align = 2 * world_size  # DeepSpeed pads each group to a multiple of 2 x world size (zero_to_fp32)
        if _ceil_to(offset, align) != _ceil_to(part_numel * world_size, align):
            raise ExportError(f"{tag_dir}: group {g}'s parameters take {offset} elements but its partitions hold "
                              f"{part_numel * world_size}; the checkpoint does not match its param_shapes")
    for name, shape in (ms.get("frozen_param_shapes") or {}).items():  # frozen parameters are saved whole
        frag = ms["frozen_param_fragments"][name]
        tensors.append(TensorPlan(name, tuple(shape), frag.dtype, [_extent(ms_path, frag)]))
    tensors += _buffers(ms_path, ms["module"], ms.get("buffer_names") or [])
    return CheckpointPlan(tag_dir, stage, world_size, tensors, dict(ms.get("shared_params") or {}))


def _plan_zero3(tag_dir: Path, files: list[Path], states: list[dict]) -> CheckpointPlan:
    world_size = len(files)
    ms_paths = [tag_dir / ZERO3_MODEL_STATES.format(rank=r) for r in range(world_size)]
    for path in ms_paths:
        if not path.is_file():
            raise ExportError(f"{path}: missing; a ZeRO-3 checkpoint holds one model-states file per rank")
    ms = [load_mapped(p) for p in ms_paths]
    flat = [st["fp32_flat_groups"] for st in states]
    rank_numel = sum(t.numel() for t in flat[0])
    if any(sum(t.numel() for t in f) != rank_numel for f in flat):
        sizes = [sum(t.numel() for t in f) for f in flat]
        raise ExportError(f"{tag_dir}: ranks hold different numbers of fp32 elements: {sizes}")
    tensors, offset = [], 0
    for name, shape in ((k, v) for group in ms[0]["param_shapes"] for k, v in group.items()):
        numel = math.prod(shape)
        part = math.ceil(numel / world_size)
        extents = []
        for rank in range(world_size):
            take = min(part, numel - rank * part)
            if take > 0:
                extents += _flat_extents(files[rank], flat[rank], offset, take)
        tensors.append(TensorPlan(name, tuple(shape), torch.float32, extents))
        offset += part
    if offset != rank_numel:
        raise ExportError(f"{tag_dir}: parameters take {offset} elements per rank but each rank holds {rank_numel}; "
                          "the checkpoint does not match its param_shapes")
    for name, shape in (ms[0].get("frozen_param_shapes") or {}).items():  # frozen: partitioned the same way
        numel = math.prod(shape)
        part, extents = math.ceil(numel / world_size), []
        for rank in range(world_size):
            take = min(part, numel - rank * part)
            if take > 0:
                extents.append(_extent(ms_paths[rank], ms[rank]["frozen_param_fragments"][name], 0, take))
        tensors.append(TensorPlan(name, tuple(shape), ms[0]["frozen_param_fragments"][name].dtype, extents))
    tensors += _buffers(ms_paths[0], ms[0]["module"], ms[0].get("buffer_names") or [])
    return CheckpointPlan(tag_dir, 3, world_size, tensors, dict(ms[0].get("shared_params") or {}))


def _plan_stage0(tag_dir: Path) -> CheckpointPlan:
    """Stage 0: one model-states file; fp32 masters in the optimizer state when training was bf16/fp16."""
    from pretrain.engine import optimizer_group

    path = tag_dir / MODEL_STATES_FILE
    ms = load_mapped(path)
    module, buffer_names = ms["module"], set(ms.get("buffer_names") or [])
    seen, aliases, params, buffers = {}, {}, [], []
    for name, t in module.items():  # tied parameters share one storage in the module state dict
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if torch.is_tensor(t) else id(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        (buffers if name in buffer_names else params).append(name)
    optimizer = ms.get("optimizer") or {}
    masters = optimizer.get("fp32_groups") or optimizer.get("fp32_groups_flat")
    if masters is None:
        low = [n for n in params if module[n].dtype != torch.float32]
        if low:
            log.warning("%s: no fp32 master weights in the checkpoint; exporting the %s module weights", path,
                        module[low[0]].dtype)
        tensors = [TensorPlan(n, tuple(module[n].shape), module[n].dtype, [_extent(path, module[n])]) for n in params]
    else:
        groups = [[n for n in params if optimizer_group(len(module[n].shape)) == g] for g in range(2)]
        groups = [g for g in groups if g] if len(masters) < 2 else groups
        if len(masters) != len(groups):
            raise ExportError(f"{path}: {len(masters)} optimizer groups of fp32 weights, the module's parameters form {len(groups)}")
        tensors = []
        for g, (names, master) in enumerate(zip(groups, masters)):
            if isinstance(master, (list, tuple)):  # one fp32 tensor per parameter
                got = [tuple(t.shape) for t in master]
                if got != [tuple(module[n].shape) for n in names]:
                    raise ExportError(f"{path}: optimizer group {g} holds {len(got)} fp32 tensors that do not match "
                                      f"the {len(names)} module parameters of that group (shapes differ)")
                tensors += [TensorPlan(n, tuple(t.shape), torch.float32, [_extent(path, t)])
                            for n, t in zip(names, master)]
            else:  # one flat fp32 vector per group
                offset = 0
                for n in names:
                    numel = module[n].numel()
                    extents = [_extent(path, master, offset, numel)]
                    tensors.append(TensorPlan(n, tuple(module[n].shape), torch.float32, extents))
                    offset += numel
    tensors += _buffers(path, module, buffers)
    return CheckpointPlan(tag_dir, 0, 1, tensors, aliases)


WRITE_CHUNK_BYTES = 64 << 20
"""Bytes written (and then released from this process's mapping) per ``pwrite`` (64 MiB)."""
PAGE_BYTES = mmap.PAGESIZE


@lru_cache(maxsize=1)
def _madvise():
    """libc's ``madvise(addr, length, advice)`` (the C library of this process)."""
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


def release_pages(t: torch.Tensor) -> int:
    """Drop the pages wholly inside ``t``'s bytes from this process (``madvise(MADV_DONTNEED)``); returns the bytes.

    Only for views of a file mapping (:func:`load_mapped`, private or shared): the file and the page
    cache keep the data and touching ``t`` again maps it back. On anonymous memory it would zero the
    data, so :class:`TensorWriter` calls it for checkpoint extents only. A no-op where ``madvise`` is
    missing (not Linux).

    Raises:
        OSError: madvise refused the range.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    start = t.data_ptr()
    lo = -(-start // PAGE_BYTES) * PAGE_BYTES
    hi = (start + t.numel() * t.element_size()) // PAGE_BYTES * PAGE_BYTES
    if hi <= lo:
        return 0
    if _madvise()(lo, hi - lo, mmap.MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_DONTNEED) of {hi - lo} bytes at {lo:#x}: {os.strerror(err)}")
    return hi - lo


NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM)
"""``copy_file_range`` errors that mean the kernel or file system cannot copy these files (the fallback can)."""


class TensorWriter:
    """Writes planned tensors into an open file, one at a time; ``close()`` (or ``with``) closes the checkpoint files.

    As stored: extents with a file offset are copied page cache to page cache inside the kernel
    (``os.copy_file_range``: the data never enters this process); others, or where the kernel refuses, are
    written from the mapped pages, which are then released. Cast: into one reused buffer (of the largest of
    ``cast_plans``, sparing the kernel zeroing fresh pages for every tensor), then written.
    """

    def __init__(self, cast_plans: list[TensorPlan] = (), cast_dtype: torch.dtype | None = None):
        most = max((t.numel for t in cast_plans), default=0)
        self._buffer = torch.empty(most, dtype=cast_dtype) if most and cast_dtype is not None else None
        self._fds: dict[str, int] = {}
        self.kernel_copy = hasattr(os, "copy_file_range")
        """Copy with ``os.copy_file_range``; cleared once the kernel refuses."""

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def write(self, plan: TensorPlan, out_fd: int, out_offset: int, dtype: torch.dtype | None = None) -> int:
        """Write the full tensor's bytes (row-major, little-endian) to ``out_fd`` from byte ``out_offset``; returns
        the bytes written. ``dtype`` None or ``plan.dtype``: as stored; another dtype: cast as ``Tensor.to`` casts
        (round to nearest even).
        """
        if dtype is None or dtype == plan.dtype:
            pos = out_offset
            for ext in plan.extents:
                pos += self._copy(ext, out_fd, pos)
            return pos - out_offset
        if self._buffer is None or self._buffer.dtype != dtype or self._buffer.numel() < plan.numel:
            self._buffer = torch.empty(plan.numel, dtype=dtype)
        out, pos = self._buffer[:plan.numel], 0
        for ext in plan.extents:
            out[pos:pos + ext.numel].copy_(ext.data)
            release_pages(ext.data)
            pos += ext.numel
        if pos != plan.numel:
            raise ExportError(f"{plan.name}: planned {pos} elements for a tensor of {plan.numel}")
        return pwrite_all(out_fd, memoryview(out.view(torch.uint8).numpy()), out_offset)

    def _copy(self, ext: Extent, out_fd: int, out_offset: int) -> int:
        data = ext.data.view(torch.uint8)
        done = 0
        while done < data.numel():
            want = min(data.numel() - done, WRITE_CHUNK_BYTES)
            n = self._kernel_copy(ext, done, want, out_fd, out_offset + done)
            if n is None:  # from the mapped pages, released after
                chunk = data[done:done + want]
                n = pwrite_all(out_fd, memoryview(chunk.numpy()), out_offset + done)
                release_pages(chunk)
            done += n
        return done

    def _kernel_copy(self, ext: Extent, start: int, nbytes: int, out_fd: int, out_offset: int) -> int | None:
        if not self.kernel_copy or ext.offset_bytes is None:
            return None
        if ext.path not in self._fds:
            self._fds[ext.path] = os.open(ext.path, os.O_RDONLY)
        try:
            n = os.copy_file_range(self._fds[ext.path], out_fd, nbytes, ext.offset_bytes + start, out_offset)
        except OSError as exc:
            if exc.errno not in NO_KERNEL_COPY:
                raise
            log.info("os.copy_file_range unavailable here (%s); writing from the mapped pages", exc)
            self.kernel_copy = False
            return None
        if n == 0:
            raise ExportError(f"{ext.path}: ends at byte {ext.offset_bytes + start}, {nbytes} bytes short; truncated")
        return n


def pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    """Write all of ``view`` to ``fd`` from byte ``offset`` (pwrite may write less per call); returns its bytes."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done
