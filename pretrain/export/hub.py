"""Push an export folder to the Hugging Face Hub: ``create_repo``, optionally a branch, then ``upload_folder``.

The endpoint and token are huggingface_hub's (``HF_ENDPOINT``, ``HF_TOKEN`` or ``huggingface-cli
login``). Any failure (no network, bad token, no permission) becomes one :class:`HubError` line;
the local folder is only read, so it stays complete and verified.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import HubError

log = logging.getLogger(__name__)


@dataclass
class PushOptions:
    repo_id: str
    """``user/name`` or ``org/name`` on the Hub."""
    private: bool = False
    """Create the repository private (no effect when it exists)."""
    revision: str = ""
    """Branch to push to, created from main when missing; ``{step}`` is replaced by the checkpoint's step
    (``step-{step}`` gives one branch per training step). Empty = main."""
    commit_message: str = ""
    """Commit message; empty = ``lmforge export of <checkpoint> (step N)``."""

    def validate(self) -> list[str]:
        """Problems with the options, each naming the option."""
        problems = []
        if self.repo_id.count("/") != 1 or not all(self.repo_id.split("/")):
            problems.append(f"--push-to-hub {self.repo_id!r} (expected user/name or org/name)")
        try:
            self.revision.format(step=0)
        except (KeyError, IndexError, ValueError):
            problems.append(f"--revision {self.revision!r} (only {{step}} may be substituted)")
        return problems


def push_folder(folder: str | Path, options: PushOptions, step: int, checkpoint_name: str) -> str:
    """Upload ``folder`` to ``options.repo_id``; returns the commit URL.

    Raises:
        HubError: any failure of the Hub side, as one line naming the endpoint, repository and cause.
    """
    from huggingface_hub import constants, create_branch, create_repo, upload_folder

    revision = options.revision.format(step=step) or None
    message = options.commit_message or f"lmforge export of {checkpoint_name} (step {step})"
    target = f"{constants.ENDPOINT}/{options.repo_id}" + (f"@{revision}" if revision else "")
    log.info("pushing %s to %s", folder, target)
    try:
        create_repo(options.repo_id, private=options.private, exist_ok=True, repo_type="model")
        if revision:
            create_branch(options.repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = upload_folder(folder_path=str(folder), repo_id=options.repo_id, revision=revision,
                               commit_message=message, repo_type="model")
    except Exception as exc:  # network, auth, permission, server: whatever the Hub side raised, one line for the user
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise HubError(f"push of {folder} to {target} failed ({type(exc).__name__}: {cause}); "
                       f"the local export {folder} is complete and unchanged") from exc
    url = getattr(commit, "commit_url", None) or str(commit)
    log.info("pushed: %s", url)
    return url
