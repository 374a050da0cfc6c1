"""Where a claim starts (outbox.claim): resuming after the last batch never strands a row."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outbox import HandlerRegistry, Relay, RelayConfig
from outbox.claim import ClaimCursor
from outbox.message import OutboxMessage

T0 = datetime(2030, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)


async def insert(conn: AsyncConnection, tag: str, available_at: datetime) -> None:
    await conn.execute(
        text(
            "INSERT INTO outbox (topic, payload, available_at) "
            "VALUES ('t', jsonb_build_object('tag', CAST(:tag AS text)), :at)"
        ),
        {"tag": tag, "at": available_at},
    )


async def backlog(engine: AsyncEngine, count: int) -> None:
    async with engine.begin() as conn:
        for n in range(count):
            await insert(conn, f"b{n}", T0 + timedelta(seconds=n))


def tags(rows: list[OutboxMessage]) -> list[str]:
    return [row.payload["tag"] for row in rows]


async def mark_sent(conn: AsyncConnection, rows: list[OutboxMessage]) -> None:
    await conn.execute(
        text("UPDATE outbox SET sent_at = :now WHERE id = ANY(:ids)"),
        {"now": NOW, "ids": [r.id for r in rows]},
    )


async def test_claims_resume_after_a_full_batch_and_find_a_late_row_before_reporting_none(
    engine: AsyncEngine,
) -> None:
    """A row committed behind the resume point (its transaction began earlier) is claimed as
    soon as the claims from the resume point run dry: "nothing due" comes only from a full
    claim."""
    await backlog(engine, 6)
    cursor = ClaimCursor()
    claimed: list[list[str]] = []
    for step in range(4):
        async with engine.begin() as conn:
            rows = await cursor.claim(conn, limit=3, now=NOW)
            claimed.append(tags(rows))
            await mark_sent(conn, rows)
            if step == 0:  # committed with this batch: behind the resume point it leaves
                await insert(conn, "late", T0 - timedelta(seconds=1))

    assert claimed == [["b0", "b1", "b2"], ["b3", "b4", "b5"], ["late"], []]


async def test_a_full_claim_is_made_every_rescan_interval_even_while_a_backlog_lasts(
    engine: AsyncEngine,
) -> None:
    await backlog(engine, 9)
    ticks = [0.0]
    cursor = ClaimCursor(rescan_every=1.0, clock=lambda: ticks[0])

    async def claim() -> list[str]:
        async with engine.begin() as conn:
            rows = await cursor.claim(conn, limit=3, now=NOW)
            await mark_sent(conn, rows)
            return tags(rows)

    assert await claim() == ["b0", "b1", "b2"]
    async with engine.begin() as conn:
        await insert(conn, "late", T0 - timedelta(seconds=1))
    assert await claim() == ["b3", "b4", "b5"]  # resumed: the late row is behind
    ticks[0] = 1.5
    assert await claim() == ["late", "b6", "b7"]  # the rescan is due: from the start
    assert await claim() == ["b8"]


async def test_rows_a_batch_released_are_claimed_again_by_the_same_relay(
    engine: AsyncEngine,
) -> None:
    """A full batch moves the resume point past rows that were then released untouched (their
    turn came after the start deadline): the same relay's next claim still finds them."""
    await backlog(engine, 4)
    seen: list[str] = []

    async def slow(message: OutboxMessage) -> None:
        seen.append(message.payload["tag"])
        await asyncio.sleep(0.2)

    registry = HandlerRegistry()
    registry.register("t", slow)
    relay = Relay(engine, registry, RelayConfig(batch_size=4, concurrency=1, send_timeout=0.3))
    first = await relay.run_once(due_before=NOW)
    assert first.claimed == 4 and first.released >= 1

    second = await relay.run_once(due_before=NOW)

    assert second.claimed == first.released
    assert seen == ["b0", "b1", "b2", "b3"][: first.sent + second.sent]
