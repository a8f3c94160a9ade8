"""The ``lmforge`` command: parse arguments, set up logging, run one subcommand, map user errors to exit 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

COMMANDS = {"demo": ("lmforge.commands", "add_demo"), "tokenizer": ("lmforge.cli_tokenizer", "add_tokenizer"),
            "prep": ("lmforge.cli_prep", "add_prep"), "train": ("lmforge.commands", "add_train"),
            "export": ("lmforge.cli_export", "add_export"), "verify": ("lmforge.cli_export", "add_verify"),
            "eval": ("lmforge.cli_export", "add_eval"), "checkpoint": ("lmforge.cli_checkpoint", "add_checkpoint"),
            "launch": ("lmforge.cli_launch", "add_launch"), "plan": ("lmforge.cli", "add_plan")}
"""Subcommand -> (module, function adding its parser), in the order ``lmforge --help`` lists them."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``command`` alone (only its module is imported: a short
    command such as ``prep`` on a tiny input should not pay for importing the others)."""
    import importlib

    parser = argparse.ArgumentParser(prog="lmforge", description="Pretrain language models: tokenizer, prep, train, export.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, function) in COMMANDS.items():
        if command in (None, name):
            getattr(importlib.import_module(module), function)(sub)
    return parser


def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="memory per rank (parameters, gradients, optimizer states, activations) and "
                                    "whether it fits; exit 2 when it does not")
    p.add_argument("config", help="YAML training config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. deepspeed.zero_stage=3")
    p.add_argument("--nproc", type=int, default=None, help="ranks per node (default: one per GPU, or 2 on CPU)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1); world size = nproc x nodes")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p.set_defaults(handler=_plan)


def _plan(args) -> int:
    """Print the memory plan (pretrain.plan); a plan that does not fit raises its one-line refusal (exit 2)."""
    import json

    from lmforge.commands import default_nproc
    from pretrain.config import load_config
    from pretrain.plan import MemoryPlanError, check_memory, render

    nproc = args.nproc or default_nproc()
    cfg = load_config(args.config, args.overrides)
    try:
        plan = check_memory(cfg, nproc * args.nodes, nproc)
    except MemoryPlanError as exc:
        plan = exc.plan
        print(json.dumps(plan.to_dict(), indent=1) if args.json else render(plan), end="\n" if args.json else "")
        raise
    print(json.dumps(plan.to_dict(), indent=1) if args.json else render(plan), end="\n" if args.json else "")
    return 0


def env_rank() -> str | None:
    """This process's rank as its launcher set it (torchrun, MPI or Slurm variables), unchecked; None alone."""
    from lmforge_common import ENV_SCHEMES

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
    first = (sys.argv[1:] if argv is None else argv)[:1]
    parser = build_parser(first[0] if first and first[0] in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # trailing key=value overrides after options (`launch slurm CONFIG --nodes 2 max_steps=9`)
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        return args.handler(args) or 0
    except UserError as exc:
        rank = env_rank()
        first_rank = rank in (None, "0")
        if first_rank or not exc.agreed_by_all_ranks:  # an agreed error is one line for the run, not one per rank
            print(("lmforge: error: " if first_rank else f"lmforge (rank {rank}): error: ") + str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``lmforge`` console script and ``python -m lmforge``: exit with :func:`main`'s code.

    A ``train`` process leaves with ``os._exit`` once its logs and stdio are flushed, skipping the
    interpreter's finalization. The world process group outlives ``destroy_process_group`` (references from
    outside Python: refcount 11 after it in a 2-rank run, no Python referrer), and its gloo worker threads
    drop the last collectives' work objects a moment after those complete. When that lands in the
    finalization, dropping a tensor that Python owned takes the GIL, Python ends the thread, and the
    unwinding aborts the process: SIGABRT, "terminate called without an active exception", after every file
    was written (core backtrace: ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` ->
    ``TensorImpl::decref_pyobject`` -> ``PyThread_exit_thread``; PyTorch #190489). It ended about one in 100
    two-rank runs on 2 loaded cores, one or two per CI run of the suite. Every component of a run closes its
    files in ``finally`` before this point.
    """
    import faulthandler

    faulthandler.enable()  # a fatal signal (SIGABRT from a C++ terminate, SIGSEGV) prints every thread's Python stack
    if sys.argv[1:2] != ["train"]:
        sys.exit(main())
    try:
        code = main()  # argparse's SystemExit (usage, --help) leaves the usual way: no process group exists yet
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    leave(code)


def leave(code: int) -> NoReturn:
    """End this process with exit status ``code`` now: MPI finalised, logs and stdio flushed, then ``os._exit``
    (no interpreter finalization; :func:`entry` says why). Never returns."""
    _finalize_mpi()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _finalize_mpi() -> None:
    """``MPI_Finalize`` when mpi4py initialised MPI in this process (DeepSpeed's MPI discovery under mpirun):
    mpi4py does it at exit, which ``os._exit`` skips, and mpirun fails a job whose ranks never finalised."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
