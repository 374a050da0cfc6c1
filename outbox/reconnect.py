"""Waiting out the database with tenacity: retry what the infrastructure broke, nothing else.

A statement that met a lost connection, a read-only standby, an administrator's shutdown or any
other error ``outbox.dberrors`` calls the infrastructure's is tried again, after a wait, until it
succeeds (or, for work that may simply be dropped, until the relay stops). Every other error
propagates at once: a bug must crash loudly, not loop.

Two backoffs, two jobs. ``outbox.backoff.next_delay`` schedules a *message's* next try: the
delay becomes the row's ``available_at``, it survives restarts, grows from seconds to an hour,
and its count is the row's ``attempts``. The wait here is an in-process sleep between two tries
of one statement while the database is away: nothing is stored, the count is this loop's own,
and the cap is a second, so a relay resumes within about a second of the database coming back.
Both use the same shape (equal jitter: half the exponential step fixed, half random), so an
outage is never a hot loop and a hundred relays do not retry in step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_never,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from outbox.dberrors import is_infrastructure_error

T = TypeVar("T")
D = TypeVar("D")

# 0.1-0.2 s after the first failure, doubling up to 0.5-1 s.
DATABASE_BASE_S = 0.2
DATABASE_CAP_S = 1.0

# Equal jitter from tenacity's own parts: the fixed half of the step (``base/2 * 2^(n-1)``,
# capped at ``cap/2``) plus a random draw from ``[0, that half]``.
DATABASE_WAIT = wait_exponential(
    multiplier=DATABASE_BASE_S / 2, max=DATABASE_CAP_S / 2
) + wait_random_exponential(multiplier=DATABASE_BASE_S / 2, max=DATABASE_CAP_S / 2)


def _retryable(exc: BaseException) -> bool:
    """Infrastructure errors only, and never a cancellation (or ``KeyboardInterrupt``): tenacity
    hands every ``BaseException`` to this predicate, and a ``CancelledError`` raised while an
    outage was being handled carries that outage in its ``__context__``."""
    return isinstance(exc, Exception) and is_infrastructure_error(exc)


class _stop_when(stop_base):
    """Stop retrying once ``predicate()`` is true (the relay is stopping)."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self._predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._predicate()


async def retry_database(
    func: Callable[[], Awaitable[T]],
    *,
    before_sleep: Callable[[RetryCallState], None],
    give_up: Callable[[], bool] | None = None,
    default: D = None,  # type: ignore[assignment]
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T | D:
    """``await func()`` until it succeeds, on tenacity's ``AsyncRetrying``.

    ``before_sleep`` is called once per failed try, before the wait (``retry_state`` carries the
    try number, the error and the wait): the one log line per reconnect. With ``give_up``, the
    first failure after it returns true ends the retries and the call returns ``default``; an
    operation that must not be dropped (a settle) passes none and is retried until it succeeds.
    ``sleep`` is injectable so tests do not wait.
    """
    try:  # the usual case, without tenacity's machinery (about 140 us a call, measured)
        return await func()
    except Exception as exc:
        if not _retryable(exc):
            raise
        failed: Exception | None = exc

    retrying = AsyncRetrying(
        retry=retry_if_exception(_retryable),
        wait=DATABASE_WAIT,
        stop=_stop_when(give_up) if give_up is not None else stop_never,
        before_sleep=before_sleep,
        retry_error_callback=(lambda _state: default) if give_up is not None else None,
        reraise=True,
        sleep=sleep,
    )

    async def attempt() -> T:
        # Tenacity's first try is the failure above, so it decides, waits and logs it like any
        # other. A coroutine function of its own: tenacity calls anything else without awaiting
        # it, and ``func`` is often a lambda that returns a coroutine.
        nonlocal failed
        if failed is not None:
            error, failed = failed, None
            raise error
        return await func()

    result: T | D = await retrying(attempt)
    return result
