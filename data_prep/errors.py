"""Errors a user can fix: the CLI prints them as one line and exits non-zero (no traceback)."""


class UserError(Exception):
    """Bad input or configuration. The message is one line naming the file, field and numbers."""


class InputError(UserError):
    """A corpus input is missing, unreadable or unusable as a whole (fatal, not a record reject)."""
