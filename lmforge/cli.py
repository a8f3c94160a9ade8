"""The ``lmforge`` command: parse arguments, set up logging, run one subcommand, map user errors to exit 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from lmforge import cli_checkpoint, cli_export, cli_launch, cli_prep, cli_tokenizer, commands

    parser = argparse.ArgumentParser(prog="lmforge", description="Pretrain language models: tokenizer, prep, train, export.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (commands.add_demo, cli_tokenizer.add_tokenizer, cli_prep.add_prep, commands.add_train,
                cli_export.add_export, cli_export.add_verify, cli_export.add_eval, cli_checkpoint.add_checkpoint, cli_launch.add_launch):
        add(sub)
    return parser


def env_rank() -> str | None:
    """This process's rank as its launcher set it (torchrun, MPI or Slurm variables), unchecked; None alone."""
    from pretrain.distributed import ENV_SCHEMES

    return next((os.environ[k[1]] for k in ENV_SCHEMES if k[1] in os.environ and k[3] in os.environ), None)


def setup_logging() -> None:
    """One format for every process; ranks other than 0 log warnings only."""
    rank = env_rank() or "0"
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    from data_prep.errors import UserError

    setup_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # trailing key=value overrides after options (`launch slurm CONFIG --nodes 2 max_steps=9`)
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        return args.handler(args) or 0
    except UserError as exc:
        rank = env_rank()
        prefix = f"lmforge (rank {rank}): error: " if rank not in (None, "0") else "lmforge: error: "
        print(prefix + str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
