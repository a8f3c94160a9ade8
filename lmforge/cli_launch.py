"""``lmforge launch local|slurm|slurm-prep|mpi``: start ``lmforge train CONFIG [overrides]`` on many ranks.

Every launcher starts the same per-rank entry point, ``python -m lmforge train CONFIG [overrides]``,
with this interpreter; the config is loaded (and, before anything starts, checked against the
tokenizer and data) here, once.

``launch local`` uses lmforge's own :func:`launch.local.run_local` rather than torchrun: the same
per-rank variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), plus the failing rank named in the error, the others stopped at once, and the
cores split between ranks (``OMP_NUM_THREADS``), with no elastic agent process in between.
``torchrun --nproc-per-node N -m lmforge train CONFIG`` works as well.

Preempted ranks (a signal or ``preemption.max_minutes``; they save together and exit
:data:`~lmforge_common.EXIT_PREEMPTED`) make ``launch local`` and ``launch mpi`` print one line with
the step and the checkpoint, read here from the run dir's newest complete checkpoint, and exit with
that code: rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_launch(sub) -> None:
    p = sub.add_parser("launch", help="train on many ranks: this machine, a Slurm cluster, or under mpirun")
    launchers = p.add_subparsers(dest="launcher", required=True)

    loc = launchers.add_parser("local", help="N ranks on this machine")
    loc.add_argument("--nproc", type=int, default=None, help="ranks (default: one per GPU, or 2 on CPU)")
    _add_train_args(loc)
    loc.set_defaults(handler=_local)

    slurm = launchers.add_parser("slurm", help="render an sbatch script (one rank per GPU, or per node on CPU) and submit it")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one rank each; 0 = CPU, one rank per node")
    _add_slurm_options(slurm)
    slurm.add_argument("--no-preemption", dest="preemption", action="store_false",
                       help="no --signal/--requeue: a preempted or timed-out job just ends")
    slurm.add_argument("--signal-grace-s", type=int, default=300,
                       help="seconds before the time limit at which the ranks get SIGUSR1 to save (default 300)")
    slurm.add_argument("--socket-ifname", default=None, help="network interface for NCCL / gloo (e.g. ib0)")
    slurm.add_argument("--gpu-mem", default=None,
                       help="memory of one GPU, e.g. 80G: the memory plan checks each rank against it before submitting "
                            "(without it, GPU ranks are not checked: this machine cannot see the nodes' devices)")
    _add_train_args(slurm)
    slurm.set_defaults(handler=_slurm)

    prep = launchers.add_parser("slurm-prep", help="data prep as a Slurm job array, one task per part, plus a dependent merge")
    prep.add_argument("--num-tasks", type=int, required=True, help="parts, one array task each")
    prep.add_argument("--output", required=True, help="prepared dataset folder (lmforge prep --output)")
    prep.add_argument("--max-parallel", type=int, default=None, help="array tasks running at once (--array=...%%K)")
    _add_slurm_options(prep, batch_log=False)  # --output is the dataset; logs go to OUTPUT/slurm/
    prep.add_argument("prep_args", nargs=argparse.REMAINDER,
                      help="after --: the lmforge prep options, e.g. -- --input 'corpus/*.jsonl' --tokenizer tok")
    prep.set_defaults(handler=_slurm_prep)

    mpi = launchers.add_parser("mpi", help="N ranks under OpenMPI's mpirun (locally or on a hostfile's hosts)")
    mpi.add_argument("--np", type=int, default=None, help="ranks (default: one per GPU, or 2 on CPU)")
    mpi.add_argument("--hostfile", default=None, help="OpenMPI hostfile; its first host is the rendezvous address")
    mpi.add_argument("--master-addr", default=None, help="rendezvous address (default: first host, or 127.0.0.1)")
    mpi.add_argument("--master-port", type=int, default=None, help="rendezvous port")
    _add_train_args(mpi)
    mpi.set_defaults(handler=_mpi)


def _add_train_args(p) -> None:
    p.add_argument("--force", action="store_true", help="start even when the memory plan (lmforge plan) says it does not fit")
    p.add_argument("config", help="YAML training config")
    p.add_argument("overrides", nargs="*", help="dotted overrides passed to every rank, e.g. max_steps=100")


def _add_slurm_options(p, batch_log: bool = True) -> None:
    options = [("partition", "partition"), ("account", "account charged"), ("qos", "quality of service"),
               ("time", "time limit, e.g. 2-00:00:00"), ("constraint", "node features, e.g. a100"),
               ("mem", "memory per node, e.g. 64G (0 = all)"), ("job-name", "job name")]
    if batch_log:
        options.append(("output", "the batch script's own log (%%j = job id; default RUN_DIR/slurm/%%j-batch.out)"))
    for name, help_text in options:
        p.add_argument(f"--{name}", default=None, help=f"sbatch --{name}: {help_text}")
    p.add_argument("--cpus-per-task", type=int, default=None, help="sbatch --cpus-per-task (also OMP_NUM_THREADS)")
    p.add_argument("--exclusive", action="store_true", help="sbatch --exclusive: whole nodes")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); write and submit nothing")


def _slurm_options(args, batch_log: bool = True):
    from launch.slurm import SlurmOptions

    return SlurmOptions(nodes=getattr(args, "nodes", 1), gpus_per_node=getattr(args, "gpus_per_node", 0),
                        cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account, qos=args.qos,
                        time=args.time, constraint=args.constraint, exclusive=args.exclusive, mem=args.mem,
                        output=getattr(args, "output", None) if batch_log else None, job_name=args.job_name,
                        preemption=getattr(args, "preemption", False), signal_grace_s=getattr(args, "signal_grace_s", 300),
                        socket_ifname=getattr(args, "socket_ifname", None))


def _train_command(args, check: bool, device: str | None = None):
    """``(per-rank command, resolved config)``; ``check`` also runs the tokenizer / data consistency checks
    (``device``: where the ranks train, cuda or cpu; default: this machine's)."""
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if check:
        from pretrain.trainer import preflight

        preflight(cfg, device=device)
    return [sys.executable, "-m", "lmforge", "train", os.path.abspath(args.config), *args.overrides], cfg


def _default_ranks(value: int | None) -> int:
    from lmforge.commands import default_nproc

    return value if value is not None else default_nproc()


def _preempted(cfg) -> int:
    """After the ranks exited ``EXIT_PREEMPTED``: print one line naming the step and the checkpoint they saved
    (the run dir's newest complete one), and return that code for this process to exit with."""
    from lmforge_common import EXIT_PREEMPTED
    from pretrain.checkpoint import latest_complete, read_state
    from pretrain.layout import CHECKPOINT_DIR

    checkpoint_dir = Path(cfg.run_dir).resolve() / CHECKPOINT_DIR
    newest = latest_complete(checkpoint_dir)
    if newest is None:  # a hostfile run whose run dir is not shared with this host
        where = f"the checkpoint is on rank 0's host (none complete in {checkpoint_dir} here)"
    else:
        where = f"at step {read_state(newest)['step']} of {cfg.max_steps}, checkpoint {newest} saved"
    print(f"lmforge: preempted {where} (exit code {EXIT_PREEMPTED}); rerun the same command to resume")
    return EXIT_PREEMPTED


def memory_preflight(args, world_size: int, ranks_per_node: int, device: str | None = None,
                     available_bytes: int | str | None = "this machine",
                     host_available_bytes: int | str | None = "this machine", unknown: str = "") -> None:
    """Refuse before any rank starts when the memory plan (pretrain.plan) does not fit; ``--force`` only warns.

    ``available_bytes`` per rank: ``"this machine"`` (measured here), a number, or None (unknown: only printed,
    with ``unknown`` saying what would make it checked); ``host_available_bytes`` the same for the host memory of
    a GPU rank.

    Raises:
        MemoryPlanError: one line: needed and available bytes per rank, and the knob that would fit.
    """
    from pretrain.config import load_config
    from pretrain.plan import MemoryPlanError, check_memory

    try:
        plan = check_memory(load_config(args.config, args.overrides), world_size, ranks_per_node, device,
                            available_bytes, host_available_bytes)
    except MemoryPlanError as exc:
        if not args.force:
            raise
        print(f"lmforge: warning (--force): {exc}", file=sys.stderr)
        return
    verdict = "fits" if plan.fits else f"NOT CHECKED: available memory unknown{unknown}"
    print(f"memory plan: {plan.per_rank_bytes / 2**30:.2f} GiB per rank of "
          f"{(plan.available_bytes or 0) / 2**30:.2f} GiB available: {verdict}", file=sys.stderr)


def _hosts(hostfile: str | None) -> int:
    """Hosts named in an OpenMPI hostfile (one per non-comment line); 1 without one."""
    if not hostfile:
        return 1
    lines = [ln.split("#")[0].strip() for ln in Path(hostfile).read_text(encoding="utf-8").splitlines()]
    return max(1, sum(1 for ln in lines if ln))


def _cluster_node_mem(partition: str | None) -> int | None:
    """The smallest node memory (bytes) ``sinfo`` reports for ``partition`` (all partitions without one); None
    when sinfo is missing, fails or reports none. Slurm's ``RealMemory`` is in MiB (``%m``, "+" when nodes differ)."""
    import shutil
    import subprocess

    if not shutil.which("sinfo"):
        return None
    command = ["sinfo", "--noheader", "--format=%m", *(["--partition", partition] if partition else [])]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = [int(word.rstrip("+")) for word in out.split() if word.rstrip("+").isdigit()]
    return min(sizes) * 2**20 if sizes and min(sizes) > 0 else None


def _slurm_memory(args, gpus_per_node: int) -> tuple[int | None, int | None, str]:
    """``(device bytes per rank, host bytes per rank, what is unknown)`` for the memory plan of a Slurm job: the
    host memory is ``--mem`` (per node) or, without it, the smallest node of the partition per ``sinfo``, divided
    among the node's ranks; the device memory ``--gpu-mem``. CPU nodes: both are the host memory."""
    per_node = max(gpus_per_node, 1)
    node_mem = _mem_bytes(args.mem) or _cluster_node_mem(args.partition)
    host = node_mem // per_node if node_mem else None
    if not gpus_per_node:
        return host, host, "" if host else " (give --mem, or run where sinfo answers)"
    device = _mem_bytes(args.gpu_mem, default_unit=2**30) if args.gpu_mem else None
    return device, host, "" if device else " (give --gpu-mem, e.g. 80G)"


def _mem_bytes(mem: str | None, default_unit: int = 2**20) -> int | None:
    """sbatch ``--mem`` (default unit MiB; K, M, G, T suffixes) in bytes; None when absent or 0 (all). ``default_unit``:
    bytes of a number without a suffix."""
    if not mem or mem.strip() in ("0", "0M", "0G"):
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = mem.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(float(text) * default_unit)


def _local(args) -> int:
    from launch.errors import RanksPreempted
    from launch.local import run_local

    memory_preflight(args, _default_ranks(args.nproc), _default_ranks(args.nproc))
    command, cfg = _train_command(args, check=True)
    nproc = _default_ranks(args.nproc)
    try:
        run_local(command, nproc, run_dir=os.path.abspath(cfg.run_dir))
    except RanksPreempted:
        return _preempted(cfg)
    print(f"trained on {nproc} local ranks: {cfg.run_dir}")
    return 0


def _mpi(args) -> int:
    from launch.errors import RanksPreempted
    from launch.mpi import run_mpi

    memory_preflight(args, _default_ranks(args.np), -(-_default_ranks(args.np) // _hosts(args.hostfile)))
    command, cfg = _train_command(args, check=True)
    np = _default_ranks(args.np)
    try:
        run_mpi(command, np, args.hostfile, args.master_addr, args.master_port, run_dir=os.path.abspath(cfg.run_dir))
    except RanksPreempted:
        return _preempted(cfg)
    print(f"trained on {np} MPI ranks: {cfg.run_dir}")
    return 0


def _slurm(args) -> int:
    from launch.sbatch_scripts import SLURM_DIR, render_train_script
    from launch.slurm import submit, write_script

    opts = _slurm_options(args)
    if not args.dry_run:  # the plan is checked against the nodes' memory where it is known (_slurm_memory)
        device, host, unknown = _slurm_memory(args, opts.gpus_per_node)
        memory_preflight(args, opts.world_size, max(opts.gpus_per_node, 1), "gpu" if opts.gpus_per_node else "cpu",
                         device, host, unknown)
    command, cfg = _train_command(args, check=not args.dry_run, device="cuda" if opts.gpus_per_node else "cpu")
    run_dir = os.path.abspath(cfg.run_dir)
    script = render_train_script(opts, command, run_dir, os.getcwd())
    if args.dry_run:
        print(script, end="")
        return 0
    path = write_script(Path(run_dir) / SLURM_DIR / "train.sbatch", script)
    job_id = submit(path)
    print(f"submitted job {job_id}: {opts.nodes} node(s), {opts.world_size} ranks; script {path}; "
          f"logs {Path(run_dir) / SLURM_DIR}/{job_id}-rank<R>.log")
    return 0


def _slurm_prep(args) -> int:
    from launch.errors import LaunchError
    from launch.sbatch_scripts import SLURM_DIR, render_prep_scripts
    from launch.slurm import submit, write_script

    prep_args = args.prep_args[1:] if args.prep_args[:1] == ["--"] else args.prep_args
    clash = [a for a in prep_args if a.split("=")[0] in ("--output", "--num-tasks", "--task-id")]
    if clash:
        raise LaunchError(f"slurm-prep sets {', '.join(clash)} itself: give --output / --num-tasks before --")
    output = os.path.abspath(args.output)
    array, merge = render_prep_scripts(_slurm_options(args, batch_log=False), sys.executable, prep_args, output, args.num_tasks,
                                       os.getcwd(), args.max_parallel)
    if args.dry_run:
        print(f"{array}\n# ---- merge job (sbatch --dependency=afterok:<array job id>) ----\n{merge}", end="")
        return 0
    folder = Path(output) / SLURM_DIR
    array_id = submit(write_script(folder / "prep-array.sbatch", array))
    merge_id = submit(write_script(folder / "prep-merge.sbatch", merge), dependency=f"afterok:{array_id}")
    print(f"submitted prep array job {array_id} ({args.num_tasks} tasks) and merge job {merge_id} (afterok); "
          f"scripts and logs in {folder}")
    return 0
