"""Where a claim starts (outbox.claim): resuming after the last batch never strands a row."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outbox import queries
from outbox.claim import ClaimCursor
from outbox.queries import Claimed, ClaimOwner

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


CLAIMER = ClaimOwner(uuid.uuid4(), 30.0, ["t"])


def tags(rows: list[Claimed]) -> list[str]:
    return [row.message.payload["tag"] for row in rows]


async def mark_sent(conn: AsyncConnection, rows: list[Claimed]) -> None:
    await conn.execute(
        text("UPDATE outbox SET sent_at = :now, claimed_by = NULL WHERE id = ANY(:ids)"),
        {"now": NOW, "ids": [r.message.id for r in rows]},
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
            rows = await cursor.claim(conn, limit=3, now=NOW, claimer=CLAIMER, clock=NOW)
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
            rows = await cursor.claim(conn, limit=3, now=NOW, claimer=CLAIMER, clock=NOW)
            await mark_sent(conn, rows)
            return tags(rows)

    assert await claim() == ["b0", "b1", "b2"]
    async with engine.begin() as conn:
        await insert(conn, "late", T0 - timedelta(seconds=1))
    assert await claim() == ["b3", "b4", "b5"]  # resumed: the late row is behind
    ticks[0] = 1.5
    assert await claim() == ["late", "b6", "b7"]  # the rescan is due: from the start
    assert await claim() == ["b8"]


async def test_a_claim_counts_the_attempt_and_holds_the_row_for_its_lease_only(
    engine: AsyncEngine,
) -> None:
    """The claim commits on its own: the row is not claimable again until its lease runs out,
    and then only as an abandoned row (one at a time, by CLAIM_ABANDONED)."""
    await backlog(engine, 2)
    async with engine.begin() as conn:
        first = await queries.claim_due(conn, limit=1, now=NOW, claimer=CLAIMER, clock=NOW)
    assert tags(first) == ["b0"] and first[0].attempt == 1
    assert first[0].message.attempts == 0  # the handler still sees the failures before it
    other = ClaimOwner(uuid.uuid4(), 30.0, ["t"])
    async with engine.begin() as conn:
        assert tags(await queries.claim_due(conn, limit=5, now=NOW, claimer=other, clock=NOW)) == [
            "b1"
        ]
        later = NOW + timedelta(seconds=31)
        assert await queries.claim_due(conn, limit=5, now=later, claimer=other, clock=later) == []
        taken = await queries.claim_abandoned(
            conn, now=later, claimer=other, max_attempts=5, held=[]
        )
    assert taken is not None and taken.message.payload["tag"] == "b0" and taken.attempt == 2


async def test_a_claim_takes_only_the_topics_it_serves_and_spends_nothing_on_others(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO outbox (topic, payload, available_at) VALUES ('other', '{}', :at)"),
            {"at": T0},
        )
    await backlog(engine, 1)
    async with engine.begin() as conn:
        rows = await queries.claim_due(conn, limit=10, now=NOW, claimer=CLAIMER)
        other = (
            await conn.execute(
                text("SELECT attempts, claimed_by FROM outbox WHERE topic = 'other'")
            )
        ).one()
    assert tags(rows) == ["b0"]
    assert tuple(other) == (0, None)


async def test_a_claim_says_when_it_took_every_due_row(engine: AsyncEngine) -> None:
    """``exhausted``: only a full claim (from the start of the index) that took fewer rows than
    asked, none of them left out for the byte budget, lets the relay wait for a NOTIFY."""
    await backlog(engine, 5)
    cursor = ClaimCursor()

    async def claim(limit: int, budget: int = 2**62) -> list[str]:
        async with engine.begin() as conn:
            rows = await cursor.claim(
                conn, limit=limit, now=NOW, claimer=CLAIMER, clock=NOW, budget=budget
            )
            await mark_sent(conn, rows)
            return tags(rows)

    assert await claim(2) == ["b0", "b1"]
    assert not cursor.exhausted  # a full batch: there may be more
    assert await claim(2, budget=1) == ["b2"]
    assert not cursor.exhausted  # b3 was left out for the budget, not because none was due
    assert await claim(3) == ["b3", "b4"]
    assert cursor.exhausted
    assert await claim(3) == []
    assert cursor.exhausted


async def test_a_claim_commits_asynchronously_without_changing_the_session(
    engine: AsyncEngine,
) -> None:
    """The claim turns synchronous_commit off for its own transaction only: the session (which
    behind PgBouncer is shared with other clients) keeps its setting."""
    await backlog(engine, 1)
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        rows = await ClaimCursor().claim(conn, limit=5, now=NOW, claimer=CLAIMER, clock=NOW)
        setting = (await conn.execute(text("SHOW synchronous_commit"))).scalar_one()
    assert tags(rows) == ["b0"]
    assert setting == "on"
