"""Launcher errors a user can fix; the CLI prints them as one line with a non-zero exit."""


class LaunchError(Exception):
    """A launch could not be started or one of its processes failed; names the rank and exit code."""
