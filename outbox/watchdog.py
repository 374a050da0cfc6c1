"""Cut off sends that outlive the send timeout, with one timer per batch instead of one per send.

``asyncio.timeout`` around every send arms and cancels a timer each time: measured on the relay
process draining no-op messages, about a fifth of its CPU. A batch's workers instead note when
their current send started (a dict write); a single timer fires at the earliest deadline that
could have passed, cancels the workers whose send is past it, and re-arms for the next one. A
batch of quick sends never sees the timer fire at all.

The cancellation is told apart from any other (a shutdown) the way ``asyncio.timeout`` does it:
the watchdog remembers which tasks it cancelled, and ``Task.uncancel`` says whether anyone else
cancelled them too.
"""

from __future__ import annotations

import asyncio

# A timer may fire a hair before its deadline (the loop's clock resolution); within this much,
# the send counts as late rather than earning another trip round the event loop.
_SLACK_S = 0.001


class SendWatchdog:
    """Deadlines for the sends of one batch; ``close()`` when the batch is done."""

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._started: dict[asyncio.Task[object], float] = {}
        self._cut_off: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, task: asyncio.Task[object]) -> None:
        """``task`` begins a send now."""
        now = self._loop.time()
        self._started[task] = now
        if self._timer is None:
            self._timer = self._loop.call_at(now + self._timeout, self._check)

    def finish(self, task: asyncio.Task[object]) -> None:
        """``task``'s send is over, however it ended."""
        del self._started[task]
        if task in self._cut_off:  # cancelled by us, but the send swallowed the cancellation
            self._cut_off.discard(task)
            task.uncancel()

    def timed_out(self, task: asyncio.Task[object]) -> bool:
        """On a CancelledError in ``task``'s send: True if it is only the watchdog's doing (the
        send is then over, and the error is a timeout); False means propagate the cancel."""
        if task not in self._cut_off:
            return False
        self._cut_off.discard(task)
        return task.uncancel() == 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        now = self._loop.time()
        earliest: float | None = None
        for task, started in self._started.items():
            deadline = started + self._timeout
            if deadline <= now + _SLACK_S:
                if task not in self._cut_off:
                    self._cut_off.add(task)
                    task.cancel()
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._timer = self._loop.call_at(earliest, self._check)
