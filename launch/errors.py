"""Launcher errors a user can fix; the CLI prints them as one line with a non-zero exit."""
from lmforge_common import EXIT_PREEMPTED, UserError


class LaunchError(UserError):
    """A launch could not be started or one of its processes failed; names the rank and exit code."""


class RanksPreempted(LaunchError):
    """The ranks saved a checkpoint together and exited :data:`~lmforge_common.EXIT_PREEMPTED`: resumable.

    Not a failure: ``lmforge launch local|mpi`` catch it, print where the run stopped and exit
    :attr:`exit_code`. A caller that does not (the demo) reports it as an error rather than going on
    as if training had finished.
    """

    exit_code = EXIT_PREEMPTED
