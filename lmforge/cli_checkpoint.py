"""``lmforge checkpoint verify``: check every checkpoint of a run (or one checkpoint) against its recorded digests."""
from __future__ import annotations

from pathlib import Path


def add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="inspect checkpoints")
    cmds = p.add_subparsers(dest="checkpoint_command", required=True)
    v = cmds.add_parser("verify", help="check checkpoints against the sizes and checksums recorded when they were saved",
                        description="Print each complete checkpoint as OK, or name its bad files. Exit 1 when the "
                                    "checkpoint a resume would pick first (the newest) is bad.")
    v.add_argument("path", help="a run folder (all its checkpoints) or one checkpoint folder")
    v.add_argument("--mode", default="checksum", choices=("size", "checksum"),
                   help="size: byte counts only; checksum (default): re-read and hash every byte (XXH3-128)")
    v.set_defaults(handler=_verify)


def _checkpoints(path: Path) -> list[Path]:
    from pretrain.checkpoint import STATE_FILE, complete_checkpoints
    from pretrain.errors import ExportError
    from pretrain.layout import CHECKPOINT_DIR

    if (path / STATE_FILE).is_file():
        return [path]
    found = [p for _, p in complete_checkpoints(path / CHECKPOINT_DIR)] or [p for _, p in complete_checkpoints(path)]
    if not found:
        raise ExportError(f"{path}: no complete checkpoint (neither a checkpoint folder nor a run folder with {CHECKPOINT_DIR}/)")
    return found


def _verify(args) -> int:
    from pretrain.checkpoint import verify_saved

    found = _checkpoints(Path(args.path))
    verdicts = [verify_saved(p, args.mode) for p in reversed(found)]  # newest first
    for verdict in verdicts:
        rate = f" ({verdict.bytes_checked / 1e9:.2f} GB in {verdict.seconds:.1f} s)" if verdict.bytes_checked else ""
        print(verdict.line() + rate)
    if not verdicts[0].usable:
        fallback = next((v.path.name for v in verdicts if v.usable), None)
        print(f"the newest checkpoint {verdicts[0].path.name} is bad; a resume falls back to "
              + (fallback or "nothing (no usable checkpoint is left)"))
        return 1
    return 0
