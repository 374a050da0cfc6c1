"""What `outbox status`, `outbox show` and the dashboard call a message, on every path a real
relay takes it down: "retrying" means it failed at least once and will be tried again, so a
message on its first try is still pending (the attempt is counted at claim, issue 10)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import HandlerRegistry, Relay, RelayConfig, TransientSendError, admin, enqueue
from outbox.dashboard.queries import State, list_messages


class Gate:
    """A handler that waits, mid-send, until the test says how the try ends."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.calls = 0
        self._outcome: asyncio.Future[BaseException | None] | None = None

    async def __call__(self, message: object) -> None:
        self.calls += 1
        self._outcome = asyncio.get_running_loop().create_future()
        self.started.set()
        error = await self._outcome
        if error is not None:
            raise error

    async def in_flight(self) -> None:
        async with asyncio.timeout(10):
            await self.started.wait()
        self.started.clear()

    def finish(self, error: BaseException | None = None) -> None:
        assert self._outcome is not None
        self._outcome.set_result(error)


async def _states(engine: AsyncEngine) -> dict[str, float]:
    """The counts of `outbox status`, checked against the per-row rule (``outbox show``), the
    per-topic table and the dashboard's pending/retrying lists: one rule, four readers."""
    counts = await admin.status(engine)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT id FROM outbox ORDER BY id"))).all()
        listed = {
            state: [
                r["id"]
                for r in (
                    await list_messages(conn, state=state, topic=None, q=None, after=None)
                ).rows
            ]
            for state in (State.PENDING, State.RETRYING)
        }
    shown: dict[str, int] = {}
    for (row_id,) in rows:
        found = await admin.show(engine, row_id)
        assert found is not None
        shown[found["state"]] = shown.get(found["state"], 0) + 1
        if found["state"] in ("pending", "retrying"):
            assert row_id in listed[State(found["state"])], (row_id, found["state"])
    for state in ("pending", "retrying", "dead", "sent"):
        assert shown.get(state, 0) == counts[state], (state, shown, counts)
    [topic] = await admin.by_topic(engine)
    assert (topic["pending"], topic["retrying"]) == (counts["pending"], counts["retrying"])
    return counts


def _counts(**expected: int) -> Callable[[dict[str, float]], bool]:
    return lambda counts: all(counts[k] == v for k, v in expected.items())


async def _until(
    engine: AsyncEngine, check: Callable[[dict[str, float]], bool], what: str
) -> dict[str, float]:
    """Poll `outbox status` until ``check`` holds (the relay settles in the background), then
    read every view of it once the state holds still."""
    async with asyncio.timeout(10):
        while not check(await admin.status(engine)):
            await asyncio.sleep(0.02)
        return await _states(engine)
    raise AssertionError(what)  # pragma: no cover - the timeout raises first


async def _enqueue(engine: AsyncEngine, count: int = 1) -> None:
    async with engine.begin() as conn:
        for n in range(count):
            await enqueue(conn, topic="t", payload={"n": n})


def _relay(engine: AsyncEngine, gate: Gate, **config: Any) -> Relay:
    registry = HandlerRegistry()
    registry.register("t", gate)
    settings: dict[str, Any] = {
        "poll_interval": 0.05,
        "backoff_base": 0.05,
        "backoff_cap": 0.05,
        **config,
    }
    return Relay(engine, registry, RelayConfig(**settings))


async def _stopped(relay: Relay, task: Awaitable[None]) -> None:
    relay.stop()
    async with asyncio.timeout(10):
        await task


async def test_status_first_try_in_flight_is_pending_and_a_failure_makes_it_retrying(
    engine: AsyncEngine,
) -> None:
    await _enqueue(engine)
    gate = Gate()
    relay = _relay(engine, gate)
    task = asyncio.create_task(relay.run())
    try:
        await gate.in_flight()
        # Claimed, attempt counted (attempts = 1), nothing failed yet: pending, not retrying.
        assert _counts(pending=1, retrying=0)(await _states(engine))

        gate.finish(TransientSendError("SMTP 451 try later"))
        await gate.in_flight()  # the retry, due 0.05 s later, is on its second try now
        # Failed once and being tried again: retrying, in flight or not.
        assert _counts(pending=0, retrying=1)(await _states(engine))

        gate.finish()
        await _until(engine, _counts(pending=0, retrying=0, sent=1), "sent")
    finally:
        await _stopped(relay, task)


async def test_status_failed_message_waiting_for_its_next_try_is_retrying(
    engine: AsyncEngine,
) -> None:
    await _enqueue(engine)
    gate = Gate()
    relay = _relay(engine, gate, backoff_base=3600.0, backoff_cap=3600.0)
    task = asyncio.create_task(relay.run())
    try:
        await gate.in_flight()
        gate.finish(TransientSendError("SMTP 451 try later"))
        counts = await _until(engine, _counts(retrying=1), "the failure settled")
        assert counts["pending"] == 0 and counts["oldest_pending_age_s"] == 0  # not due yet
    finally:
        await _stopped(relay, task)


async def test_status_claim_released_on_stop_is_pending_again(engine: AsyncEngine) -> None:
    """A stop hands back the claims that never started (attempt given back, last_error as it
    was): a message that was waiting for a worker is pending again, not retrying."""
    await _enqueue(engine, 2)
    gate = Gate()
    relay = _relay(engine, gate, concurrency=1, batch_size=2)
    task = asyncio.create_task(relay.run())
    await gate.in_flight()  # one runs; the other is claimed and waits for the only worker
    async with engine.connect() as conn:
        claimed = (
            await conn.execute(text("SELECT count(*) FROM outbox WHERE claimed_by IS NOT NULL"))
        ).scalar_one()
    assert claimed == 2
    assert _counts(pending=2, retrying=0)(await _states(engine))

    relay.stop()
    gate.finish()  # the running send completes within the stop bound
    async with asyncio.timeout(10):
        await task

    counts = await _states(engine)
    assert (counts["pending"], counts["retrying"], counts["sent"]) == (1, 0, 1)
    async with engine.connect() as conn:
        released = (
            await conn.execute(
                text("SELECT attempts, last_error, claimed_by FROM outbox WHERE sent_at IS NULL")
            )
        ).one()
    assert tuple(released) == (0, None, None)


async def test_status_message_of_a_relay_that_died_is_retrying_once_rescued(
    engine: AsyncEngine,
) -> None:
    """A relay dies mid-try (here: cancelled, its lock session closed). Until a live relay
    rescues the message it looks as it did (pending: first try, nothing recorded); rescued, its
    last_error says the relay died, a failure, so it is retrying on its next try."""
    await _enqueue(engine)
    first = Gate()
    dying = _relay(engine, first)
    task = asyncio.create_task(dying.run())
    await first.in_flight()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert _counts(pending=1, retrying=0)(await _states(engine))

    second = Gate()
    rescuer = _relay(engine, second)
    rescuing = asyncio.create_task(rescuer.run())
    try:
        await second.in_flight()
        assert _counts(pending=0, retrying=1)(await _states(engine))
        found = await admin.show(engine, 1)
        assert found is not None and found["last_error"] == "relay died while handling it"
        second.finish()
        await _until(engine, _counts(retrying=0, sent=1), "sent by the rescuer")
    finally:
        await _stopped(rescuer, rescuing)


async def test_status_dead_message_requeued_by_outbox_retry_is_retrying(
    engine: AsyncEngine,
) -> None:
    """`outbox retry` gives a dead message fresh attempts and keeps why it died: it failed and
    will be tried again, so it is retrying (attempts 0), until it is sent."""
    await _enqueue(engine)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE outbox SET dead_at = now(), attempts = 15, last_error = 'SMTP 550'")
        )
    assert _counts(dead=1, pending=0, retrying=0)(await _states(engine))

    assert await admin.retry(engine, ids=[1], all_dead=False) == [1]

    assert _counts(dead=0, pending=0, retrying=1)(await _states(engine))
