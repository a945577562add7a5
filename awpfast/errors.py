"""The one error type for bad input. Imports nothing from awpfast (the bottom of the house)."""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A problem with the command line, the arguments or their files, reported as one line (no traceback).

    Every CLI turns it into ``PROG: error: MESSAGE`` and exit status 2; API callers can catch it as a
    ``ValueError``."""
