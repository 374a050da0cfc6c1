"""SendWatchdog: one timer per batch cuts off late sends and never swallows a shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from outbox.watchdog import SendWatchdog


async def guarded_send(watchdog: SendWatchdog, seconds: float, *, swallow: bool = False) -> str:
    """What the relay's ``_attempt`` does around a handler, with a sleep as the handler."""
    task = asyncio.current_task()
    assert task is not None
    watchdog.start(task)
    try:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            if not swallow:
                raise
        return "done"
    except asyncio.CancelledError:
        if not watchdog.timed_out(task):
            raise
        return "timed out"
    finally:
        watchdog.finish(task)


async def test_a_late_send_is_cut_off_at_its_deadline_and_its_task_goes_on() -> None:
    watchdog = SendWatchdog(0.1)
    began = time.monotonic()

    async def worker() -> list[str]:
        first = await guarded_send(watchdog, 30)
        second = await guarded_send(watchdog, 0.01)  # the same task, not left cancelled
        return [first, second]

    task = asyncio.create_task(worker())
    assert await task == ["timed out", "done"]
    assert 0.09 <= time.monotonic() - began < 5.0  # cut at 0.1 s, not after the 30 s sleep
    assert task.cancelling() == 0
    watchdog.close()


async def test_each_send_gets_its_own_deadline_not_the_batchs() -> None:
    """A send that starts late is measured from its own start (0.8 s of sends, 0.6 s each)."""
    watchdog = SendWatchdog(0.6)

    async def worker() -> list[str]:
        return [await guarded_send(watchdog, 0.4), await guarded_send(watchdog, 0.4)]

    assert await asyncio.create_task(worker()) == ["done", "done"]
    watchdog.close()


async def test_quick_sends_are_never_cancelled() -> None:
    """Many short sends over several timeouts' worth of time: the timer fires and re-arms
    between them, and cuts none (each would need a 0.2 s stall of the loop to be late)."""
    watchdog = SendWatchdog(0.2)

    async def worker() -> set[str]:
        outcomes = set()
        for _ in range(600):
            outcomes.add(await guarded_send(watchdog, 0.001))
        return outcomes

    assert await asyncio.create_task(worker()) == {"done"}
    watchdog.close()


async def test_a_send_that_swallows_the_cut_off_leaves_its_task_uncancelled() -> None:
    watchdog = SendWatchdog(0.05)

    async def worker() -> str:
        return await guarded_send(watchdog, 30, swallow=True)

    task = asyncio.create_task(worker())
    assert await task == "done"
    assert task.cancelling() == 0
    watchdog.close()


async def test_a_shutdown_cancel_that_meets_the_cut_off_still_cancels() -> None:
    watchdog = SendWatchdog(0.05)
    task = asyncio.create_task(guarded_send(watchdog, 30))
    await asyncio.sleep(0)  # the send has started
    time.sleep(0.1)  # past its deadline, without letting the loop run
    await asyncio.sleep(0)  # the loop runs us, then the overdue timer: the task is cut off...
    await asyncio.sleep(0)  # (we run again before the task does)
    task.cancel()  # ...and, before it runs again, shut down
    assert task.cancelling() == 2  # both cancellations are pending at once

    with pytest.raises(asyncio.CancelledError):
        await task
    watchdog.close()


async def test_a_shutdown_cancel_before_the_deadline_is_not_taken_for_a_timeout() -> None:
    watchdog = SendWatchdog(10)
    task = asyncio.create_task(guarded_send(watchdog, 30))
    await asyncio.sleep(0.05)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    watchdog.close()


async def test_a_send_past_slow_after_is_reported_once_and_still_cut_off_at_its_timeout() -> None:
    slow: list[asyncio.Task[object]] = []
    watchdog = SendWatchdog(0.3, slow_after=0.05, on_slow=slow.append)
    began = time.monotonic()

    task = asyncio.create_task(guarded_send(watchdog, 30))
    assert await task == "timed out"
    assert slow == [task]  # reported once, though the timer fired again for the timeout
    assert 0.29 <= time.monotonic() - began < 5.0
    watchdog.close()


async def test_quick_sends_are_never_reported_slow() -> None:
    slow: list[asyncio.Task[object]] = []
    watchdog = SendWatchdog(1.0, slow_after=0.05, on_slow=slow.append)

    async def worker() -> set[str]:
        return {await guarded_send(watchdog, 0.001) for _ in range(200)}

    assert await asyncio.create_task(worker()) == {"done"}
    assert slow == []
    watchdog.close()


async def test_a_send_started_while_the_timer_waits_for_a_timeout_is_reported_at_its_own_time() -> (
    None
):
    """The timer re-arms for the earlier event: after the first send was reported slow, the
    timer waits for that send's timeout (10 s away); the second send's slow point comes first."""
    slow: list[asyncio.Task[object]] = []
    reported = asyncio.Event()

    def on_slow(task: asyncio.Task[object]) -> None:
        slow.append(task)
        if len(slow) == 2:
            reported.set()

    watchdog = SendWatchdog(10, slow_after=0.05, on_slow=on_slow)
    first = asyncio.create_task(guarded_send(watchdog, 30))
    await asyncio.sleep(0.1)  # first is slow now; the timer waits for its timeout
    assert slow == [first]
    second = asyncio.create_task(guarded_send(watchdog, 30))
    began = time.monotonic()
    async with asyncio.timeout(5):
        await reported.wait()
    assert slow == [first, second]
    assert time.monotonic() - began < 5.0  # its own 0.05 s, not the first send's 10 s timeout
    for task in (first, second):
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    watchdog.close()


async def test_slow_after_at_or_past_the_timeout_reports_nothing() -> None:
    slow: list[asyncio.Task[object]] = []
    watchdog = SendWatchdog(0.05, slow_after=0.05, on_slow=slow.append)

    assert await asyncio.create_task(guarded_send(watchdog, 30)) == "timed out"
    assert slow == []
    watchdog.close()
