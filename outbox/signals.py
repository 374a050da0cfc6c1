"""Turn SIGTERM/SIGINT into a callback, from as early in a process's start as Python allows."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received_early: set[int] = set()


def _remember(signum: int, frame: FrameType | None) -> None:
    _received_early.add(signum)


def hold_stop_signals() -> None:
    """Until ``on_stop`` takes over, remember a stop signal instead of dying of it.

    Supervisors stop processes that are still starting (a rolling deploy, a scale-down). Dying
    of the default action there reads as a crash ("killed by signal"); holding the signal lets
    the process stop the way it does when running, cleanly and with exit status 0. Only the
    interpreter's own start-up, before any of our code runs, is left to the default action.
    """
    _received_early.clear()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


@contextlib.contextmanager
def on_stop(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` on SIGTERM or SIGINT while inside the block (main thread only).

    A signal held by ``hold_stop_signals`` before the block calls ``callback`` at once.
    """
    loop = asyncio.get_running_loop()
    installed = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, callback)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    if _received_early:
        _received_early.clear()
        callback()
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
