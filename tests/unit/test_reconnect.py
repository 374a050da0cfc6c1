"""The database wait on tenacity (outbox.reconnect): what is retried, how long it waits, when it
gives up. No database: the errors are the ones psycopg raises, built by hand."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg
import pytest
from tenacity import RetryCallState

from outbox.reconnect import DATABASE_WAIT, retry_database


class _Script:
    """Fails with each of ``errors`` in turn, then returns "done"; records the waits asked."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.waits: list[float] = []
        self.logged: list[tuple[int, str]] = []

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def before_sleep(self, state: RetryCallState) -> None:
        assert state.outcome is not None
        self.logged.append((state.attempt_number, type(state.outcome.exception()).__name__))


def _run(
    script: _Script, *, give_up: Callable[[], bool] | None = None, default: object = None
) -> Awaitable[object]:
    return retry_database(
        lambda: script(),  # a lambda that returns a coroutine, as the relay passes
        before_sleep=script.before_sleep,
        give_up=give_up,
        default=default,
        sleep=script.sleep,
    )


async def test_reconnect_retries_connection_errors_with_one_log_call_per_try() -> None:
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    script = _Script(lost, lost, lost)

    assert await _run(script) == "done"

    assert script.calls == 4
    assert script.logged == [
        (1, "OperationalError"),
        (2, "OperationalError"),
        (3, "OperationalError"),
    ]
    assert len(script.waits) == 3


async def test_reconnect_lets_a_bug_through_at_once() -> None:
    script = _Script(ValueError("a bug"))

    with pytest.raises(ValueError, match="a bug"):
        await _run(script)

    assert script.calls == 1 and script.logged == [] and script.waits == []


async def test_reconnect_never_swallows_a_cancellation_that_met_an_outage() -> None:
    """A CancelledError raised while an outage was handled carries it as __context__; tenacity
    hands BaseExceptions to the predicate, which must not mistake it for the outage."""
    cancelled = asyncio.CancelledError()
    cancelled.__context__ = psycopg.OperationalError("connection lost")
    script = _Script(cancelled)

    with pytest.raises(asyncio.CancelledError):
        await _run(script)

    assert script.calls == 1


async def test_reconnect_gives_up_with_the_default_once_told_to() -> None:
    """A claim gives up once the relay stops (nothing is lost by not claiming): the failure
    after the stop returns the default, without another wait or log line."""
    lost = psycopg.OperationalError("connection refused")
    script = _Script(lost, lost, lost, lost)

    async def second_try_meets_a_stop() -> str:
        try:
            return await script()
        finally:
            stopping.append(True)

    stopping: list[bool] = []
    result: str | list[str] = await retry_database(
        second_try_meets_a_stop,
        before_sleep=script.before_sleep,
        give_up=lambda: len(stopping) >= 2,
        default=["gave up"],
        sleep=script.sleep,
    )
    assert result == ["gave up"]
    assert script.calls == 2 and script.logged == [(1, "OperationalError")]


def test_reconnect_wait_is_equal_jitter_doubling_to_a_one_second_cap() -> None:
    """0.1-0.2 s after the first failure, doubling, then 0.5-1 s: never a hot loop, resumes
    within about a second, and relays that failed together do not retry in step."""
    bounds = {1: (0.1, 0.2), 2: (0.2, 0.4), 3: (0.4, 0.8), 4: (0.5, 1.0), 30: (0.5, 1.0)}
    for attempt, (low, high) in bounds.items():
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        waits = [DATABASE_WAIT(state) for _ in range(500)]
        assert low <= min(waits) and max(waits) <= high, attempt
        assert max(waits) - min(waits) > (high - low) / 2, "jittered"
