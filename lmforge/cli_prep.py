"""``lmforge prep``: tokenize and pack a corpus; ``prep merge DIR`` and ``prep stats DIR``.

Argument design: ``prep`` itself takes the prep options (``lmforge prep --input ... --tokenizer
... --output ...``, as before), and it also holds *optional* sub-commands ``merge`` and ``stats``
that take a folder. argparse tries a sub-command only for a bare word, and prep's own options
all start with ``--``, so the two forms never collide; ``prep``'s required options are checked
by the handler, not by argparse, so that ``prep merge DIR`` does not demand them.

In a Slurm job array, ``--task-id`` and ``--num-tasks`` default to the array index
(``SLURM_ARRAY_TASK_ID`` relative to ``SLURM_ARRAY_TASK_MIN``, divided by
``SLURM_ARRAY_TASK_STEP``) and ``SLURM_ARRAY_TASK_COUNT``; outside one, to task 0 of 1.
"""
from __future__ import annotations

import json
import os
from typing import Mapping


def slurm_array_task(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """``(task_id, num_tasks)`` of this Slurm array element, or ``None`` outside a job array."""
    if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
        return None
    index = int(environ["SLURM_ARRAY_TASK_ID"])
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
    step = int(environ.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
    return (index - first) // step, int(environ["SLURM_ARRAY_TASK_COUNT"])


def add_prep(sub) -> None:
    p = sub.add_parser("prep", help="tokenize and pack a corpus into Arrow shards (also: prep merge DIR, prep stats DIR)",
                       description="lmforge prep --input ... --tokenizer DIR --output DIR [options]  |  "
                                   "lmforge prep merge DIR  |  lmforge prep stats DIR")
    p.add_argument("--input", nargs="+", help="corpus paths, globs, folders, 'stdlib' or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--tokenizer", help="tokenizer folder (tokenizer.json inside)")
    p.add_argument("--output", help="prepared dataset folder")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence (default 512)")
    p.add_argument("--val-fraction", type=float, default=0.005, help="fraction of documents held out, by content hash")
    p.add_argument("--text-column", default="text", help="field holding the text (jsonl, parquet, Arrow, Hub)")
    p.add_argument("--text-mode", choices=("file", "line"), default="file",
                   help="plain-text files: one document per file (default) or per line")
    p.add_argument("--objective", choices=("clm", "mlm"), default="clm",
                   help="clm: EOS after each document; mlm: sequences framed by the tokenizer's post-processor")
    p.add_argument("--no-dedup", action="store_true",
                   help="keep exact duplicates (by default a document whose normalised text came earlier is dropped)")
    p.add_argument("--near-dedup", action="store_true",
                   help="also drop near duplicates (datatrove MinHash; pip install 'lmforge[dedup]')")
    p.add_argument("--near-dedup-ngrams", type=int, default=5, help="near dedup: words per shingle (default 5)")
    p.add_argument("--near-dedup-buckets", type=int, default=14, help="near dedup: LSH buckets (default 14)")
    p.add_argument("--near-dedup-hashes-per-bucket", type=int, default=8,
                   help="near dedup: MinHashes per bucket (default 8; threshold ~ (1/buckets)**(1/hashes))")
    p.add_argument("--tail", choices=("drop", "pad"), default="drop", help="the last partial sequence per split")
    p.add_argument("--fim-rate", type=float, default=0.0,
                   help="fraction of documents rearranged for fill-in-the-middle (needs a tokenizer trained with --fim)")
    p.add_argument("--fim-spm-rate", type=float, default=0.5, help="of the FIM documents, the fraction in SPM order (default 0.5)")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: one per CPU; 1: in-process)")
    p.add_argument("--num-tasks", type=int, default=None, help="tasks the corpus is split into (default: Slurm array size, else 1)")
    p.add_argument("--task-id", type=int, default=None, help="this task (default: Slurm array index, else 0)")
    p.add_argument("--sequences-per-shard", type=int, default=16384, help="packed sequences per Arrow shard")
    p.add_argument("--no-merge", action="store_true", help="do not merge when this task finds all tasks finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder (or this task's part)")
    p.set_defaults(handler=_prep, parser=p)
    actions = p.add_subparsers(dest="prep_command", required=False, metavar="{merge,stats}")
    m = actions.add_parser("merge", help="merge the tasks' parts of DIR and write its manifest")
    m.add_argument("dir", help="prepared dataset folder")
    m.set_defaults(handler=_merge)
    s = actions.add_parser("stats", help="document / token counts and a document-length histogram PNG")
    s.add_argument("dir", nargs="?", help="prepared dataset folder (optional with --blend)")
    s.add_argument("--blend", metavar="TRAIN_YAML", default=None,
                   help="also show the effective mixture of this training config's data.blend (caps, schedule) over its "
                        "max_steps x global batch")
    s.add_argument("--world-size", type=int, default=1, help="with --blend: data-parallel ranks of the run (default 1)")
    s.add_argument("--png", default=None, help="histogram path (default DIR/doc_lengths.png)")
    s.add_argument("--json", default=None, help="also write the statistics to this JSON file")
    s.set_defaults(handler=_stats, parser=s)


def _prep(args) -> int:
    from data_prep.prep import PrepConfig, prepare

    missing = [flag for flag, value in (("--input", args.input), ("--tokenizer", args.tokenizer), ("--output", args.output))
               if not value]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)} (or use: prep merge DIR, prep stats DIR)")
    task_id, num_tasks = slurm_array_task(os.environ) or (0, 1)
    cfg = PrepConfig(inputs=args.input, tokenizer=args.tokenizer, output=args.output, seq_len=args.seq_len,
                     val_fraction=args.val_fraction, text_column=args.text_column, text_mode=args.text_mode,
                     objective=args.objective, dedup=not args.no_dedup, near_dedup=args.near_dedup,
                     near_dedup_ngrams=args.near_dedup_ngrams, near_dedup_buckets=args.near_dedup_buckets,
                     near_dedup_hashes_per_bucket=args.near_dedup_hashes_per_bucket, tail=args.tail,
                     fim_rate=args.fim_rate, fim_spm_rate=args.fim_spm_rate, workers=args.workers,
                     num_tasks=args.num_tasks if args.num_tasks is not None else num_tasks,
                     task_id=args.task_id if args.task_id is not None else task_id,
                     sequences_per_shard=args.sequences_per_shard, overwrite=args.overwrite, merge=not args.no_merge,
                     show_progress=not args.no_progress)
    manifest = prepare(cfg)
    if manifest is None:
        print(f"task {cfg.task_id} of {cfg.num_tasks} done; the last task to finish (or lmforge prep merge {cfg.output}) "
              "writes the manifest")
    return 0


def _merge(args) -> int:
    from data_prep.merge import merge

    c = merge(args.dir)["counts"]
    print(f"{args.dir}: {c['documents']:,} documents, {c['tokens']:,} tokens, {c['sequences']:,} sequences, {c['rejects']:,} rejects")
    return 0


def _mixture_report(config_path: str, world_size: int) -> str:
    """The effective mixture of a training config's blend over its planned samples (data_prep.stats.format_mixture)."""
    from data_prep.blend import BlendedReader
    from data_prep.stats import format_mixture
    from pretrain.config import load_config
    from pretrain.sources import schedule_samples

    cfg = load_config(config_path)
    if not cfg.data.blend:
        return f"{config_path}: data.blend is empty: no mixture"
    ds = cfg.deepspeed
    global_batch = ds.micro_batch_size * ds.gradient_accumulation_steps * world_size
    reader = BlendedReader.from_dirs([b.path for b in cfg.data.blend], [b.weight for b in cfg.data.blend], seed=cfg.seed,
                                     max_epochs=[b.max_epochs for b in cfg.data.blend],
                                     schedule=schedule_samples(cfg.data, global_batch))
    planned = cfg.max_steps * global_batch
    rows = [{**m, "weight": b.weight, "max_epochs": b.max_epochs, "sequences": len(r)}
            for b, m, r in zip(cfg.data.blend, reader.mixture(planned), reader.readers)]
    return format_mixture(rows, planned, len(cfg.data.blend_schedule))


def _stats(args) -> int:
    from pathlib import Path

    from data_prep.shards import read_manifest
    from data_prep.stats import HISTOGRAM_PNG, format_report, plot_histogram, summarize

    if args.blend:
        print(_mixture_report(args.blend, args.world_size))
    if not args.dir:
        if not args.blend:
            args.parser.error("prep stats needs DIR or --blend TRAIN_YAML")
        return 0
    manifest = read_manifest(args.dir)
    report = summarize(manifest)
    png = plot_histogram(manifest, args.png or Path(args.dir) / HISTOGRAM_PNG)
    report["histogram_png"] = str(png)
    print(format_report(report))
    print(f"histogram: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
