"""Launcher errors a user can fix; the CLI prints them as one line with a non-zero exit."""
from lmforge_common import UserError


class LaunchError(UserError):
    """A launch could not be started or one of its processes failed; names the rank and exit code."""
