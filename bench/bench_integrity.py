"""What checkpoint and shard verification cost, in seconds per GB, measured on a checkpoint-like folder.

The folder (default ~1 GB) has the files of a 2-rank ZeRO-2 checkpoint in their usual proportions: one
model-states file (fp32 weights, 4 bytes per parameter) and two optimizer-state partitions (fp32 master copy
and Adam's two moments, 12 bytes per parameter, split over the ranks), plus the small RNG files; random bytes.
Measured, each in alternating rounds (median kept):

- **write**: writing the folder (plain buffered writes, as ``torch.save`` does; no fsync): the save a hash adds to;
- **hash at save**: :func:`pretrain.integrity.write_rank_digests` for one rank owning every file, right after the
  write (pages cached), i.e. what ``pretrain.checkpoint.save`` adds to every save (split over the ranks);
- **verify size**: ``checkpoint.verify=size`` (a stat per file);
- **verify checksum, cached**: ``checkpoint.verify=checksum`` with the pages in memory (a resume soon after a save);
- **verify checksum, cold**: the same after the files' pages were dropped (``posix_fadvise(DONTNEED)``, which
  affects only these files), i.e. read from the disk, as a resume on a fresh node does;
- **shard sha256, cached**: ``data.verify_checksums`` (sha256 of each shard) on the same bytes.

Usage: ``python bench/bench_integrity.py [--gb 1.0] [--rounds 3] [--dir DIR]``; writes ``bench/results/bench_integrity.json``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's packages (bench/ is on sys.path already)

from common import alternate, print_rows, row, write_result  # noqa: E402

from data_prep.shards import sha256_file  # noqa: E402
from pretrain import integrity  # noqa: E402

CHUNK = 64 << 20


def layout(total_bytes: int) -> dict[str, int]:
    """File name -> size of a 2-rank ZeRO-2 checkpoint of ``total_bytes`` (4 + 12 bytes per parameter)."""
    params = total_bytes // 16
    return {"mp_rank_00_model_states.pt": 4 * params,
            "zero_pp_rank_0_mp_rank_00_optim_states.pt": 6 * params,
            "zero_pp_rank_1_mp_rank_00_optim_states.pt": 6 * params,
            "rng_state_rank0.pt": 15_000, "rng_state_rank1.pt": 15_000}


def write_folder(folder: Path, sizes: dict[str, int], block: bytes) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, size in sizes.items():
        with open(folder / name, "wb") as fh:
            left = size
            while left:
                n = min(left, len(block))
                fh.write(block[:n])
                left -= n


def drop_cache(folder: Path) -> None:
    """Evict the files' pages from the page cache (``posix_fadvise(DONTNEED)`` after an fsync)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the checkpoint-like folder (GB, 1e9 bytes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temporary folder)")
    args = parser.parse_args(argv)
    sizes = layout(int(args.gb * 1e9))
    gb = sum(sizes.values()) / 1e9
    work = Path(tempfile.mkdtemp(prefix="bench_integrity-", dir=args.dir))
    folder = work / "step_00000100"
    block = os.urandom(CHUNK)
    try:
        record: dict[str, dict] = {}

        def write() -> float:
            return timed(lambda: write_folder(folder, sizes, block)) / gb

        def hash_at_save() -> float:
            write_folder(folder, sizes, block)  # right after the write, as in a save
            seconds = timed(lambda: integrity.write_rank_digests(folder, 0, 1))
            record.update(integrity.merge_rank_digests(folder, 1))
            return seconds / gb

        def verify(mode: integrity.VerifyMode, cold: bool) -> float:
            if cold:
                drop_cache(folder)
            verdict = integrity.verify(folder, record, mode)
            assert verdict.status == "ok", verdict.line()
            return verdict.seconds / gb

        def sha256_cached() -> float:
            return timed(lambda: [sha256_file(folder / name) for name in sizes]) / gb

        runs = alternate({"write": write, "hash at save": hash_at_save,
                          "verify size": lambda: verify("size", False),
                          "verify checksum, cached": lambda: verify("checksum", False),
                          "verify checksum, cold": lambda: verify("checksum", True),
                          "shard sha256, cached": sha256_cached}, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    hash_share = [h / w for h, w in zip(runs["hash at save"], runs["write"])]
    how = {"write": "no hash", "hash at save": "XXH3-128", "verify size": "a stat per file",
           "verify checksum, cached": "XXH3-128", "verify checksum, cold": "XXH3-128", "shard sha256, cached": "sha256"}
    rows = [row(f"{name} ({how[name]})", "s/GB", values, better="lower") for name, values in runs.items()]
    rows.append(row("hash at save / write of the same files", "ratio", hash_share, better="lower",
                    note="what the digests add to a save's write time, one rank hashing every file; "
                         "with R ranks each hashes about 1/R of the bytes"))
    print_rows(rows)
    write_result("bench_integrity", f"Checkpoint and shard verification cost ({gb:.2f} GB checkpoint-like folder)", rows,
                 {"gb": round(gb, 3), "files": sizes, "rounds": max(args.rounds, 3), "hash": integrity.HASH_NAME,
                  "chunk_bytes": integrity.CHUNK_BYTES,
                  "cold": "pages dropped with posix_fadvise(DONTNEED) after fsync, these files only",
                  "folder_on": str(work.parent)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
