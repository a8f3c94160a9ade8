"""Subcommand parsers and handlers of the ``lmforge`` CLI; each handler is a thin call into a package."""
from __future__ import annotations


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="tokenizer -> shards -> 2-rank ZeRO training -> Hugging Face export")
    p.add_argument("--output", default="runs/demo", help="folder for every stage's output (default runs/demo)")
    p.add_argument("--objective", choices=["clm", "mlm"], default="clm",
                   help="clm: causal LM (byte-level BPE, demo.yaml); mlm: masked LM (WordPiece, the ModernBERT recipe "
                        "at a demo size, fill-mask at the end)")
    p.add_argument("--fim", action="store_true",
                   help="clm: FIM sentinels in the tokenizer, half the documents rearranged, an infill at the end")
    p.add_argument("--corpus", nargs="+", default=[],
                   help="jsonl / parquet / txt paths or globs (default: the Python stdlib's source for clm, "
                        "its help topics and docstrings for mlm)")
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

    run_demo(DemoConfig(output=args.output, corpus=args.corpus, objective=args.objective, fim=args.fim,
                        vocab_size=args.vocab_size, seq_len=args.seq_len, nproc=args.nproc or default_nproc(),
                        overrides=args.overrides))
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train on this rank (started once per rank by a launcher, or alone)")
    p.add_argument("config", help="YAML training config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 deepspeed.zero_stage=3")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume-from", default=None, help="checkpoint tag or folder to resume from (default: newest complete)")
    group.add_argument("--no-resume", action="store_true", help="refuse to start over an existing checkpoint")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; then save and exit 75")
    p.set_defaults(handler=_train)


def _train(args) -> int:
    """Exit 0 when training finished, 75 (EX_TEMPFAIL) when it stopped for preemption after a save."""
    from lmforge_common import EXIT_PREEMPTED
    from pretrain.config import load_config
    from pretrain.trainer import train

    extra = [f"checkpoint.resume={args.resume_from}"] if args.resume_from else []
    extra += ["checkpoint.resume=never"] if args.no_resume else []
    extra += [f"preemption.max_minutes={args.max_minutes}"] if args.max_minutes is not None else []
    summary = train(load_config(args.config, [*args.overrides, *extra]))
    return EXIT_PREEMPTED if summary.get("preempted") else 0
