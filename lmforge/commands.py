"""Subcommand parsers and handlers of the ``lmforge`` CLI; each handler is a thin call into a package."""
from __future__ import annotations

import argparse
import json
import sys


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="tokenizer -> shards -> 2-rank ZeRO training -> Hugging Face export")
    p.add_argument("--output", default="runs/demo", help="folder for every stage's output (default runs/demo)")
    p.add_argument("--corpus", nargs="+", default=["stdlib"], help="jsonl / parquet / txt paths or globs (default: the Python stdlib)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (tokens)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    p.add_argument("--nproc", type=int, default=None, help="data-parallel ranks (default: one per GPU, or 2 on CPU)")
    p.add_argument("overrides", nargs="*", help="dotted training-config overrides, e.g. max_steps=50")
    p.set_defaults(handler=_demo)


def default_nproc() -> int:
    """One rank per visible GPU; 2 CPU ranks when there is none."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _demo(args) -> int:
    from lmforge.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output=args.output, corpus=args.corpus, vocab_size=args.vocab_size, seq_len=args.seq_len,
                        nproc=args.nproc or default_nproc(), overrides=args.overrides))
    return 0


def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="tokenizer_command", required=True)
    t = p.add_parser("train", help="train a byte-level BPE tokenizer")
    t.add_argument("--input", nargs="+", required=True, help="corpus paths, globs, directories or 'stdlib'")
    t.add_argument("--output", required=True, help="tokenizer folder to write")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary in tokens, special tokens included")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    t.add_argument("--max-bytes", type=int, default=None, help="byte budget of training text (uniform sample)")
    t.add_argument("--text-column", default="text")
    t.set_defaults(handler=_tokenizer_train)


def _tokenizer_train(args) -> int:
    from data_prep.tokenizer import train_byte_bpe

    train_byte_bpe(args.input, args.output, args.vocab_size, args.min_frequency, args.max_bytes, args.text_column)
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train on this rank (started once per rank by a launcher, or alone)")
    p.add_argument("config", help="YAML training config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 deepspeed.zero_stage=3")
    p.set_defaults(handler=_train)


def _train(args) -> int:
    from pretrain.config import load_config
    from pretrain.trainer import train

    train(load_config(args.config, args.overrides))
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's ZeRO checkpoint to a Hugging Face folder")
    p.add_argument("run_dir")
    p.add_argument("--output", required=True)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.set_defaults(handler=_export)


def _export(args) -> int:
    from pretrain.export import export_hf

    export_hf(args.run_dir, args.output, args.tag)
    return 0


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="reload an exported folder with transformers, check logits, generate")
    p.add_argument("hf_dir")
    p.add_argument("--probe", default=None, help="probe.safetensors of the run, to compare logits")
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(handler=_verify)


def _verify(args) -> int:
    from pretrain.export import verify_export

    result = verify_export(args.hf_dir, args.probe, args.prompt)
    if result["max_abs_logit_diff"] is not None:
        print(f"logits match the trained model ({result['precision']}): max |diff| {result['max_abs_logit_diff']:.3g} "
              f"within rtol {result['tolerance']['rtol']} + atol {result['tolerance']['atol']}")
    print(f"--- {args.prompt}{result['continuation']}\n---")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


def add_launch(sub) -> None:
    p = sub.add_parser("launch", help="start a command on several ranks").add_subparsers(dest="launcher", required=True)
    loc = p.add_parser("local", help="N processes on this machine")
    loc.add_argument("--nproc", type=int, default=2)
    loc.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    loc.set_defaults(handler=_launch_local)


def _launch_local(args) -> int:
    from launch.local import run_local

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("lmforge launch local: no command given (lmforge launch local --nproc 2 -- CMD ...)", file=sys.stderr)
        return 2
    run_local(cmd, args.nproc)
    return 0
