"""The ``lmforge`` command: parse arguments, set up logging, run one subcommand, map user errors to exit 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from lmforge import cli_prep, commands

    parser = argparse.ArgumentParser(prog="lmforge", description="Pretrain language models: tokenizer, prep, train, export.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (commands.add_demo, commands.add_tokenizer, cli_prep.add_prep, commands.add_train,
                commands.add_export, commands.add_verify, commands.add_launch):
        add(sub)
    return parser


def setup_logging() -> None:
    """One format for every process; ranks other than 0 log warnings only."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    from data_prep.errors import UserError
    from launch.errors import LaunchError

    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (UserError, LaunchError) as exc:
        rank = os.environ.get("RANK")
        prefix = f"lmforge (rank {rank}): error: " if rank not in (None, "0") else "lmforge: error: "
        print(prefix + str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
