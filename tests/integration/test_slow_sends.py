"""Slow sends stop counting against ``concurrency``: the rest keep flowing, within a cap.

A send running past ``slow_after`` has its worker parked and replaced, up to ``max_slow`` parked
at once; a parked worker exits when its send ends, so the pool shrinks back. Real PostgreSQL,
handlers in-process so the test can count what runs at once.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import HandlerRegistry, OutboxMessage, Relay, RelayConfig, enqueue


class Sends:
    """Handler for topic ``t``: ``payload.hang`` sends sleep until cut off, the others take
    ``seconds``. Counts what runs at once, and which quick sends ended before the first cut."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = {"hung": 0, "quick": 0}
        self.most = {"hung": 0, "quick": 0, "all": 0}
        self.quick_done = 0
        self.quick_done_before_cut: int | None = None  # fixed when the first hung send is cut

    def _enter(self, kind: str) -> None:
        self.running[kind] += 1
        self.most[kind] = max(self.most[kind], self.running[kind])
        self.most["all"] = max(self.most["all"], sum(self.running.values()))

    async def __call__(self, message: OutboxMessage) -> None:
        kind = "hung" if message.payload.get("hang") else "quick"
        self._enter(kind)
        try:
            if kind == "hung":
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if self.quick_done_before_cut is None:
                        self.quick_done_before_cut = self.quick_done
                    raise
            await asyncio.sleep(self.seconds)
            self.quick_done += 1
        finally:
            self.running[kind] -= 1


async def enqueue_hung_first(engine: AsyncEngine, hung: int, quick: int) -> None:
    """The hung messages first (lowest ids, claimed first), so they take the workers at once."""
    async with engine.begin() as conn:
        for n in range(hung):
            await enqueue(conn, topic="t", payload={"n": n, "hang": True})
        for n in range(quick):
            await enqueue(conn, topic="t", payload={"n": hung + n})


def relay_for(
    engine: AsyncEngine, sends: Sends, *, max_slow: int, slow_after: float, send_timeout: float
) -> Relay:
    """Concurrency 2, small batches."""
    registry = HandlerRegistry()
    registry.register("t", sends)
    config = RelayConfig(
        batch_size=20,
        concurrency=2,
        max_slow=max_slow,
        slow_after=slow_after,
        send_timeout=send_timeout,
    )
    return Relay(engine, registry, config)


async def test_slow_sends_beyond_concurrency_let_the_rest_flow_and_the_cap_holds(
    engine: AsyncEngine,
) -> None:
    """3 hung sends, concurrency 2, at most 2 parked: 2 are parked, the third keeps its worker
    (the cap), the one worker left runs all 40 quick sends before any hung one is cut off.

    With a hard cap of ``concurrency`` sends (the relay before parking) the two first hung sends
    would hold both workers and nothing would move until the send timeout."""
    sends = Sends(0.01)
    await enqueue_hung_first(engine, hung=3, quick=40)
    relay = relay_for(engine, sends, max_slow=2, slow_after=0.1, send_timeout=4.0)

    result = await relay.drain()

    assert (result.sent, result.retrying) == (40, 3)
    assert sends.quick_done_before_cut == 40  # all of them flowed while the hung ones hung
    assert sends.most["hung"] == 3  # the third hung send started: a replacement worker took it
    assert sends.most["quick"] == 1  # ... and kept its worker: no third parking place
    assert sends.most["all"] == 4  # concurrency + max_slow, never more


async def test_a_parked_worker_exits_after_its_send_so_the_pool_shrinks_back(
    engine: AsyncEngine,
) -> None:
    """2 hung sends parked, then cut off at 0.5 s while quick sends remain: the quick sends
    never run more than ``concurrency`` at once, before or after the cut."""
    sends = Sends(0.03)
    await enqueue_hung_first(engine, hung=2, quick=100)
    relay = relay_for(engine, sends, max_slow=2, slow_after=0.1, send_timeout=0.5)

    result = await relay.drain()

    assert (result.sent, result.retrying) == (100, 2)
    assert sends.quick_done_before_cut is not None
    assert sends.quick_done_before_cut > 0  # they flowed while the hung ones ran
    assert sends.quick_done_before_cut < 100  # and some were left for after the cut
    assert sends.most["quick"] == 2  # the parked workers took no more jobs after their send
    assert sends.most["all"] == 4


async def test_max_slow_zero_keeps_a_hard_cap_of_concurrency_sends(engine: AsyncEngine) -> None:
    """``max_slow=0``: a slow send keeps its worker; with both workers hung nothing else runs
    until the send timeout cuts them off."""
    sends = Sends(0.001)
    await enqueue_hung_first(engine, hung=2, quick=10)
    relay = relay_for(engine, sends, max_slow=0, slow_after=0.05, send_timeout=0.5)

    result = await relay.drain()

    assert (result.sent, result.retrying) == (10, 2)
    assert sends.quick_done_before_cut == 0
    assert sends.most["all"] == 2
