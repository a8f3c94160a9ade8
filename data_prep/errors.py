"""Errors a user can fix: the CLI prints them as one line and exits non-zero (no traceback)."""
from lmforge_common import UserError

__all__ = ["UserError", "InputError", "WorkerDiedError"]


class InputError(UserError):
    """A corpus input is missing, unreadable or unusable as a whole (fatal, not a record reject)."""


class WorkerDiedError(UserError):
    """A prep worker process died from a signal (no Python exception), most often the out-of-memory killer."""
