"""Cut off sends that outlive the send timeout, with one timer per batch instead of one per send.

``asyncio.timeout`` around every send arms and cancels a timer each time: measured on the relay
process draining no-op messages, about a fifth of its CPU. A batch's workers instead note when
their current send started (a dict write); a single timer fires at the earliest deadline that
could have passed, cancels the workers whose send is past it, and re-arms for the next one. A
batch of quick sends never sees the timer fire at all.

The same timer tells the relay, once per send, when a send has run for ``slow_after`` seconds
(``on_slow``): the relay then stops counting it against its concurrency (``outbox.relay``), so a
hung send holds a worker for ``slow_after``, not for the whole ``timeout``.

The cancellation is told apart from any other (a shutdown) the way ``asyncio.timeout`` does it:
the watchdog remembers which tasks it cancelled, and ``Task.uncancel`` says whether anyone else
cancelled them too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# A timer may fire a hair before its deadline (the loop's clock resolution); within this much,
# the send counts as late rather than earning another trip round the event loop.
_SLACK_S = 0.001


class SendWatchdog:
    """Deadlines for the sends of one batch; ``close()`` when the batch is done.

    ``on_slow(task)`` is called (from the timer, never from ``start``) once for each send still
    running ``slow_after`` seconds after it started; ``slow_after=None`` never calls it.
    """

    def __init__(
        self,
        timeout: float,
        *,
        slow_after: float | None = None,
        on_slow: Callable[[asyncio.Task[object]], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        # A send is first looked at when it may be slow, or, if that never matters, at its timeout.
        watch_slow = slow_after is not None and on_slow is not None and slow_after < timeout
        self._slow_after = slow_after if watch_slow else None
        self._first_look = slow_after if watch_slow and slow_after is not None else timeout
        self._on_slow = on_slow
        self._started: dict[asyncio.Task[object], float] = {}
        self._slow: set[asyncio.Task[object]] = set()  # sends already reported slow
        self._cut_off: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, task: asyncio.Task[object]) -> None:
        """``task`` begins a send now."""
        now = self._loop.time()
        self._started[task] = now
        first = now + self._first_look
        # The timer always waits for the earliest look due. Quick sends keep it at the oldest
        # running send's first look, which is never later than this one's: nothing to re-arm.
        if self._timer is None:
            self._timer = self._loop.call_at(first, self._check)
        elif self._timer.when() > first:  # the timer waits for a timeout, further away
            self._timer.cancel()
            self._timer = self._loop.call_at(first, self._check)

    def finish(self, task: asyncio.Task[object]) -> None:
        """``task``'s send is over, however it ended."""
        del self._started[task]
        self._slow.discard(task)
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
        newly_slow: list[asyncio.Task[object]] = []
        for task, started in self._started.items():
            deadline = started + self._timeout
            if deadline <= now + _SLACK_S:
                if task not in self._cut_off:
                    self._cut_off.add(task)
                    task.cancel()
                continue
            if self._slow_after is not None and task not in self._slow:
                slow_at = started + self._slow_after
                if slow_at <= now + _SLACK_S:
                    self._slow.add(task)
                    newly_slow.append(task)
                else:
                    deadline = slow_at
            if earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._timer = self._loop.call_at(earliest, self._check)
        if self._on_slow is not None:
            for task in newly_slow:  # after the loop: the callback may start new sends
                self._on_slow(task)
