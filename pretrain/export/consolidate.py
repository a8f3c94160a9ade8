"""Streaming consolidation of DeepSpeed ZeRO checkpoints (stages 0-3, any world size) into full tensors.

Every checkpoint file is read with :func:`pretrain.export.torch_archive.load_structure`: the pickle (names,
shapes, dtypes) and the byte offset of each storage in the file, but no tensor data, and without
importing torch or DeepSpeed. A :class:`TensorPlan` lists the byte ranges in the partition files that
make up one full tensor; :meth:`TensorReader.copy` copies them as stored into the output file inside
the kernel (``os.copy_file_range``), :meth:`TensorReader.read` fills a tensor with positioned reads
(``os.preadv``) where a cast is needed. So memory holds at most one tensor, never a second copy of the
model, and the Adam moments that share the files are never read. (DeepSpeed's ``zero_to_fp32`` maps
the files and concatenates each group's partitions: a full copy of every group for stages 1-2.)

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

import errno
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.errors import ExportError
from pretrain.export.torch_archive import ITEMSIZE, TensorRef, load_structure

log = logging.getLogger(__name__)

MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
OPTIM_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
ZERO3_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


@dataclass(frozen=True)
class Extent:
    """A contiguous run of elements of one tensor inside one checkpoint file."""

    path: str
    offset_bytes: int
    """Byte offset of the run's first element in ``path``."""
    numel: int
    """Elements in the run."""


@dataclass
class TensorPlan:
    """Where the elements of one full tensor lie, in row-major order."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    """torch dtype name on disk (float32 for master weights; a buffer keeps its training dtype)."""
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
    """Elements ``start .. start + numel`` of the flattened tensor ``t`` (a TensorRef of ``path``)."""
    if not isinstance(t, TensorRef):
        raise ExportError(f"{path}: expected a tensor where the checkpoint holds {t!r}")
    if not t.is_contiguous:
        raise ExportError(f"{path}: a tensor of shape {t.shape} is not stored contiguously; cannot stream it")
    numel = t.numel - start if numel is None else numel
    if start < 0 or start + numel > t.numel:
        raise ExportError(f"{path}: elements {start}..{start + numel} are outside a tensor of {t.numel}")
    return Extent(str(path), t.byte_offset + start * t.itemsize, numel)


def _flat_extents(path: Path, groups: list, start: int, numel: int) -> list[Extent]:
    """Elements ``start .. start + numel`` of the concatenation of the 1-D tensors ``groups``."""
    out, group_start = [], 0
    end = start + numel
    for t in groups:
        group_end = group_start + t.numel
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
    states = [load_structure(p)["optimizer_state_dict"] for p in files]
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
    return [TensorPlan(n, module[n].shape, module[n].dtype, [_extent(path, module[n])], is_buffer=True)
            for n in names if n in module]


def _plan_zero12(tag_dir: Path, stage: int, files: list[Path], states: list[dict]) -> CheckpointPlan:
    ms_path = tag_dir / MODEL_STATES_FILE
    ms = load_structure(ms_path)
    world_size = len(files)
    parts = [st["single_partition_of_fp32_groups"] for st in states]
    paddings = states[0].get("param_alignment_paddings")
    tensors = []
    for g, shapes in enumerate(ms["param_shapes"]):
        part_numel = parts[0][g].numel
        if any(p[g].numel != part_numel for p in parts):
            raise ExportError(f"{tag_dir}: group {g} partitions differ in size over ranks: {[p[g].numel for p in parts]}")
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
            tensors.append(TensorPlan(name, tuple(shape), "float32", extents))
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
    ms = [load_structure(p) for p in ms_paths]
    flat = [st["fp32_flat_groups"] for st in states]
    rank_numel = sum(t.numel for t in flat[0])
    if any(sum(t.numel for t in f) != rank_numel for f in flat):
        raise ExportError(f"{tag_dir}: ranks hold different numbers of fp32 elements: {[sum(t.numel for t in f) for f in flat]}")
    tensors, offset = [], 0
    for name, shape in ((k, v) for group in ms[0]["param_shapes"] for k, v in group.items()):
        numel = math.prod(shape)
        part = math.ceil(numel / world_size)
        extents = []
        for rank in range(world_size):
            take = min(part, numel - rank * part)
            if take > 0:
                extents += _flat_extents(files[rank], flat[rank], offset, take)
        tensors.append(TensorPlan(name, tuple(shape), "float32", extents))
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
    ms = load_structure(path)
    module, buffer_names = ms["module"], set(ms.get("buffer_names") or [])
    seen: dict = {}
    aliases: dict[str, str] = {}
    params: list = []
    buffers: list = []
    for name, t in module.items():  # tied parameters share one storage in the module state dict
        key = (t.storage.data_offset, t.storage_offset, t.shape) if isinstance(t, TensorRef) else id(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        (buffers if name in buffer_names else params).append(name)
    optimizer = ms.get("optimizer") or {}
    masters = optimizer.get("fp32_groups") or optimizer.get("fp32_groups_flat")
    if masters is None:
        low = [n for n in params if module[n].dtype != "float32"]
        if low:
            log.warning("%s: no fp32 master weights in the checkpoint; exporting the %s module weights", path,
                        module[low[0]].dtype)
        tensors = [TensorPlan(n, module[n].shape, module[n].dtype, [_extent(path, module[n])]) for n in params]
    else:
        groups = [[n for n in params if optimizer_group(len(module[n].shape)) == g] for g in range(2)]
        groups = [g for g in groups if g] if len(masters) < 2 else groups
        if len(masters) != len(groups):
            raise ExportError(f"{path}: {len(masters)} optimizer groups of fp32 weights, the module's parameters form {len(groups)}")
        tensors = []
        for g, (names, master) in enumerate(zip(groups, masters)):
            if isinstance(master, (list, tuple)):  # one fp32 tensor per parameter
                got = [t.shape for t in master]
                if got != [module[n].shape for n in names]:
                    raise ExportError(f"{path}: optimizer group {g} holds {len(got)} fp32 tensors that do not match "
                                      f"the {len(names)} module parameters of that group (shapes differ)")
                tensors += [TensorPlan(n, t.shape, "float32", [_extent(path, t)]) for n, t in zip(names, master)]
            else:  # one flat fp32 vector per group
                offset = 0
                for n in names:
                    numel = module[n].numel
                    tensors.append(TensorPlan(n, module[n].shape, "float32", [_extent(path, master, offset, numel)]))
                    offset += numel
    tensors += _buffers(path, module, buffers)
    return CheckpointPlan(tag_dir, 0, 1, tensors, aliases)


COPY_CHUNK_BYTES = 64 << 20
"""Bytes per ``os.copy_file_range`` call, and the buffer of the read/write fallback (64 MiB)."""
NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM)
"""``copy_file_range`` errors that mean the kernel or file system cannot copy these files (the fallback can)."""


class TensorReader:
    """Reads planned tensors from checkpoint files with positioned reads; close() (or ``with``) closes them."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self.kernel_copy = hasattr(os, "copy_file_range")
        """Copy with ``os.copy_file_range``; cleared once the kernel refuses (then pread / pwrite)."""

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def copy(self, plan: TensorPlan, out_fd: int, out_offset: int) -> int:
        """Write the tensor's bytes, as stored (dtype ``plan.dtype``, row-major), to ``out_fd`` from byte
        ``out_offset``; returns the bytes written (``plan.numel`` x item size).

        The data never passes through this process: ``os.copy_file_range`` copies page cache to page
        cache inside the kernel (about half the time of reading and writing through a buffer, and no
        resident memory); where the kernel or file system cannot, 64 MiB positioned reads and writes.

        Raises:
            ExportError: a file ends before the bytes the plan names.
        """
        pos = out_offset
        for ext in plan.extents:
            nbytes = ext.numel * ITEMSIZE[plan.dtype]
            self._copy_range(self._fd(ext.path), ext.offset_bytes, out_fd, pos, nbytes, ext.path)
            pos += nbytes
        return pos - out_offset

    def _copy_range(self, src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int, path: str) -> None:
        done, buffer = 0, None
        while done < nbytes:
            want = min(nbytes - done, COPY_CHUNK_BYTES)
            n = None
            if self.kernel_copy:
                try:
                    n = os.copy_file_range(src, dst, want, src_offset + done, dst_offset + done)
                except OSError as exc:
                    if exc.errno not in NO_KERNEL_COPY:
                        raise
                    log.info("os.copy_file_range unavailable here (%s); copying through a buffer", exc)
                    self.kernel_copy = False
            if n is None:
                buffer = buffer if buffer is not None else memoryview(bytearray(min(nbytes, COPY_CHUNK_BYTES)))
                n = os.preadv(src, [buffer[:want]], src_offset + done)
                pwrite_all(dst, buffer[:n], dst_offset + done)
            if n == 0:
                raise ExportError(f"{path}: ends at byte {src_offset + done}, {nbytes - done} bytes short; truncated checkpoint")
            done += n

    def read(self, plan: TensorPlan, into=None):
        """The full tensor ``plan`` describes, shape ``plan.shape``, dtype ``plan.dtype``, on the CPU.

        ``into``: a 1-D uint8 tensor of at least the tensor's bytes to read into (the result is a view
        of it, valid until it is reused); None allocates a new tensor. Reusing one buffer spares the
        kernel zeroing fresh pages for every tensor.

        Raises:
            ExportError: a file ends before the bytes the plan names.
        """
        import torch

        dtype, item = getattr(torch, plan.dtype), ITEMSIZE[plan.dtype]
        out = torch.empty(plan.numel, dtype=dtype) if into is None else into[:plan.numel * item].view(dtype)
        view = memoryview(out.view(torch.uint8).numpy())  # type: ignore[arg-type]
        pos = 0
        for ext in plan.extents:
            _pread_exact(self._fd(ext.path), view[pos:pos + ext.numel * item], ext.offset_bytes, ext.path)
            pos += ext.numel * item
        if pos != len(view):
            raise ExportError(f"{plan.name}: planned {pos} bytes for a tensor of {len(view)}")
        return out.view(plan.shape)


def _pread_exact(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise ExportError(f"{path}: ends at byte {offset + done}, {len(view) - done} bytes short; truncated checkpoint")
        done += n


def pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    """Write all of ``view`` to ``fd`` from byte ``offset`` (pwrite may write less per call); returns its bytes."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done
