"""The one error type for bad input, and how a CLI stops on Ctrl-C / SIGTERM. Imports nothing from
awpfast (the bottom of the house)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

__all__ = ["UsageError", "Interrupted", "handle_interrupts", "deferred_interrupts", "check_interrupted"]


class UsageError(ValueError):
    """A problem with the command line, the arguments or their files, reported as one line (no traceback).

    Every CLI turns it into ``PROG: error: MESSAGE`` and exit status 2; API callers can catch it as a
    ``ValueError``."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM received: the CLI stops with exit status 128 + the signal number."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_pending: Optional[int] = None   # a signal received and not yet raised at a check point
_defer = 0                       # > 0 inside deferred_interrupts(): a write that must finish first


def _handler(signum, frame) -> None:
    global _pending
    _pending = signum
    if _defer == 0:
        raise Interrupted(signum)


@contextlib.contextmanager
def handle_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` (in the main thread; elsewhere a no-op). A signal
    that lands where Python swallows exceptions (a ``__del__``, a callback) is remembered and raised
    at the next :func:`check_interrupted`; inside :func:`deferred_interrupts` it waits for the block's end."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _pending = None
    for s in old:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _pending = None


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A block that a signal does not cut short (an atomic file write): the signal is raised when it ends."""
    global _defer
    _defer += 1
    try:
        yield
    except BaseException:
        _defer -= 1
        raise
    _defer -= 1
    check_interrupted()


def check_interrupted() -> None:
    """Raise :class:`Interrupted` for a signal received but not raised yet (see :func:`handle_interrupts`)."""
    global _pending
    if _pending is not None and _defer == 0:
        s, _pending = _pending, None
        raise Interrupted(s)
