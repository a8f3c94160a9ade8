"""The data loader: lmforge's memory-mapped shard loader vs a ``datasets`` IterableDataset over the
same prepared shards, vs the trainer's own consumption, and resume latency vs batch skipping.

Both loaders deliver the same thing, model-ready ``torch`` tensors for one rank's micro batches
of the prepared bench corpus (``common.bench_data``: the demo's standard-library corpus, 256-token
sequences), in a seeded shuffled order, in the main process:

- lmforge: ``ShardSource.train_batches`` (the global permutation over memory-mapped Arrow shards,
  ``pretrain.data.micro_batches``) and ``causal_lm_inputs``;
- peer: ``Dataset.from_file`` of each shard, ``concatenate_datasets(...).to_iterable_dataset()``,
  ``.shuffle(seed, buffer_size=1000)`` (the ``datasets`` default buffer), a ``torch`` DataLoader
  whose collate function builds the same tensors. Rows are left as Python objects, the fastest
  ``datasets`` format here (``with_format("numpy")`` measured about 3x slower).

In situ: the same short training run of the demo config (``llama-tiny``, micro batch 8, seq_len 256,
ZeRO-2, bf16, 2 ranks under ``lmforge launch local``) twice, alternating: once reading its batches
through the loader as every run does, once over the very same micro batches read into memory before the
first step (``debug.prebuilt_batches=true``). The ratio of their steady-state tokens/s is what the loader
costs the step (target >= 0.95x: at most 5% of the step; a tie with 1.0 means no measurable cost). It
replaces an earlier row that divided the loader's rate by a CPU toy model's consumption, which said
nothing about a real run.

Resume: lmforge positions the stream at ``consumed_samples`` by index math, O(1) in the samples
consumed; the Hugging Face Trainer resumes an epoch with ``accelerate.skip_first_batches``,
which on an IterableDataset reads and discards every batch before the resume point. Both
latencies include opening the data and producing the first batch after the resume point.

Usage: ``python bench/bench_loader.py [--repeats 3] [--batches 3000]``; writes
``bench/results/bench_loader.json``.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import common

MICRO_BATCH = 8
SEED = 1234
SHUFFLE_BUFFER = 1000
IN_SITU_TARGET = ">= 0.95x"
"""Training with the real loader runs at least 95% as fast as over pre-built batches (issue 18, item 4)."""
IN_SITU_NPROC = 2


def peer_dataloader(data_dir: Path, iterable: bool = True):
    """A torch DataLoader over the prepared train shards through ``datasets`` (see the module docstring).

    ``iterable``: an IterableDataset with a shuffle buffer; else the map-style Dataset with a
    seeded RandomSampler (what the Trainer uses for a map-style dataset).
    """
    import datasets
    import torch

    ds = datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in common.shard_paths(data_dir)])
    if iterable:
        files = len(common.shard_paths(data_dir))
        ids = ds.to_iterable_dataset(num_shards=files).shuffle(seed=SEED, buffer_size=SHUFFLE_BUFFER)
        return torch.utils.data.DataLoader(ids, batch_size=MICRO_BATCH, collate_fn=common.collate_rows)
    sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(SEED))
    return torch.utils.data.DataLoader(ds, batch_size=MICRO_BATCH, sampler=sampler, collate_fn=common.collate_rows)


def lmforge_batches(data_dir: Path, consumed_samples: int = 0):
    """Endless model-ready micro batches of rank 0 of 1 from lmforge's shard loader."""
    import torch

    from pretrain.inputs import causal_lm_inputs
    from pretrain.sources import ShardSource

    source = ShardSource(str(data_dir))
    for mb in source.train_batches(0, 1, MICRO_BATCH, SEED, consumed_samples):
        yield {k: torch.from_numpy(v) for k, v in causal_lm_inputs(mb, True).items()}


def tokens_per_s(batches, count: int) -> float:
    """Tokens/s of drawing ``count`` batches from the iterator ``batches`` (after one warm-up batch)."""
    import time

    first = next(batches)
    tokens = first["input_ids"].numel()
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * tokens / (time.perf_counter() - start)


def in_situ(tok: Path, data: Path, run_dir: Path, steps: int, prebuilt: bool) -> float:
    """Steady-state tokens/s of a short 2-rank demo-config training run, its batches read by the loader as the
    run goes or (``prebuilt``) all read into memory before its first step."""
    overrides = ["debug.prebuilt_batches=true"] if prebuilt else []
    shutil.rmtree(run_dir, ignore_errors=True)
    return common.lmforge_train(tok, data, run_dir, nproc=IN_SITU_NPROC, steps=steps, overrides=overrides)["tokens_per_s"]


def resume_latency_s(data_dir: Path, consumed_samples: int, side: str) -> float:
    """Seconds from nothing to the first micro batch after ``consumed_samples``."""
    def lmforge() -> None:
        next(lmforge_batches(data_dir, consumed_samples))

    def skip(iterable: bool):
        from accelerate import skip_first_batches

        def run() -> None:
            next(iter(skip_first_batches(peer_dataloader(data_dir, iterable), consumed_samples // MICRO_BATCH)))
        return run

    fn = {"lmforge": lmforge, "peer": skip(True), "peer_map": skip(False)}[side]
    return common.timed(fn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=common.MIN_REPEATS, help="alternating rounds (>= 3)")
    parser.add_argument("--batches", type=int, default=3000, help="micro batches timed per loader run")
    parser.add_argument("--train-steps", type=int, default=16, help="steps of each in-situ training run")
    args = parser.parse_args(argv)
    common.use_this_checkout()
    tok, data = common.bench_data()
    num_train = sum(s["sequences"] for s in json.loads((data / "manifest.json").read_text())["splits"]["train"]["shards"])
    batches = min(args.batches, num_train // MICRO_BATCH - 2)  # one epoch: the iterable peer has no more

    print(f"loader throughput: {batches} micro batches of {MICRO_BATCH} per run", flush=True)
    sides = {"lmforge": lambda: tokens_per_s(lmforge_batches(data), batches),
             "peer": lambda: tokens_per_s(iter(peer_dataloader(data)), batches)}
    tokens_per_s(lmforge_batches(data), 100)  # warm the page cache for both
    throughput = common.alternate(sides, args.repeats)

    print(f"in situ: {args.train_steps}-step training runs, loader vs pre-built batches, alternating", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        situ = common.alternate({"loader": functools.partial(in_situ, tok, data, Path(tmp) / "run", args.train_steps, False),
                                 "prebuilt": functools.partial(in_situ, tok, data, Path(tmp) / "run", args.train_steps, True)},
                                args.repeats)

    consumed = (num_train // MICRO_BATCH - 2) * MICRO_BATCH
    print(f"resume latency at consumed_samples={consumed}", flush=True)
    resume = common.alternate({side: functools.partial(resume_latency_s, data, consumed, side)
                               for side in ("lmforge", "peer", "peer_map")}, args.repeats)
    far = consumed * 10**6
    far_lmforge = [resume_latency_s(data, far, "lmforge") for _ in range(args.repeats)]

    rows = [
        common.row("loader throughput, 1 rank, main process", "tokens/s", throughput["lmforge"], throughput["peer"],
                   "datasets IterableDataset + DataLoader",
                   note=f"peer: Dataset.from_file per shard, concatenate_datasets, to_iterable_dataset(num_shards=shards)"
                        f".shuffle(seed, buffer_size={SHUFFLE_BUFFER}), DataLoader(batch_size={MICRO_BATCH}, "
                        "num_workers=0), the same collate; lmforge: ShardSource.train_batches + causal_lm_inputs"),
        common.row("training throughput with the loader, in situ", "tokens/s", situ["loader"], situ["prebuilt"],
                   "the same run over pre-built in-memory batches", target=IN_SITU_TARGET,
                   note=f"llama-tiny demo config, micro batch {MICRO_BATCH}, seq_len 256, ZeRO-2 bf16, "
                        f"{IN_SITU_NPROC} CPU ranks, {args.train_steps} steps (steady state after step 2); "
                        "pre-built: debug.prebuilt_batches=true"),
        common.row(f"resume latency at {consumed:,} consumed samples", "s", resume["lmforge"], resume["peer"],
                   "HF Trainer skip_first_batches, IterableDataset", better="lower"),
        common.row(f"resume latency at {consumed:,} consumed samples", "s", resume["lmforge"], resume["peer_map"],
                   "HF Trainer skip_first_batches, map-style Dataset", better="lower"),
        common.row(f"resume latency at {far:,} consumed samples", "s", far_lmforge,
                   note="the IterableDataset peer would read and discard every batch before this point"),
    ]
    common.print_rows(rows)
    common.write_result("bench_loader", "Data loader vs datasets IterableDataset; resume vs batch skipping", rows, {
        "micro_batch_size": MICRO_BATCH, "seq_len": 256, "train_sequences": num_train, "batches_per_run": batches,
        "shuffle_buffer": SHUFFLE_BUFFER, "in_situ_tokens_per_s": situ, "in_situ_steps": args.train_steps,
        "data": str(data)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
