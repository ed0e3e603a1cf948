"""Ctrl-C and SIGTERM mean the same thing, and a few short sections must not be cut in half by either.

A `kill` (SIGTERM: a closed terminal, a job scheduler's time limit) raises KeyboardInterrupt like Ctrl-C, so
training saves a resumable checkpoint either way. Inside `deferred()` a signal is only noted and raised as one
KeyboardInterrupt when the section ends: an optimizer step and its step counter, or a checkpoint being written,
always complete together.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

__all__ = ["install_sigterm", "deferred"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_depth = 0
_pending = False


def install_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt from now on (only the main thread may set handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _note(signum: int, frame: Any) -> None:
    global _pending
    _pending = True


@contextlib.contextmanager
def deferred(reraise: bool = True) -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM until the block ends, then raise one KeyboardInterrupt (dropped when `reraise` is False).

    Nested sections defer to the outermost one, which alone decides whether the interrupt is raised.
    """
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    if _depth == 0:
        previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
        for sig in _SIGNALS:
            signal.signal(sig, _note)
    _depth += 1
    got = False
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            got, _pending = _pending, False
    if got and reraise:
        raise KeyboardInterrupt
