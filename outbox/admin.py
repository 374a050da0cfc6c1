"""The operator's commands: status counts, dead messages, one message, retry, discard, purge."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import queries
from outbox.schema import outbox_table

logger = logging.getLogger(__name__)

PURGE_BATCH = 1000
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> timedelta:
    """``"30s"``, ``"15m"``, ``"12h"`` or ``"7d"``; ValueError otherwise.

    The unit is required: ``purge --older-than 7`` once meant 7 seconds and deleted every sent
    row, when whoever typed it meant 7 days.
    """
    match = _DURATION.match(value.lower())
    if not match:
        hint = "a duration needs its unit" if value.strip().replace(".", "", 1).isdigit() else ""
        raise ValueError(
            f"not a duration: {value!r} ({hint + ': ' if hint else ''}use e.g. 30s, 15m, 12h or 7d)"
        )
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def format_duration(value: timedelta) -> str:
    """The largest whole unit that ``parse_duration`` reads back: 7 days is "7d", not "7 days,
    0:00:00"."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# Who an email is for: the payload's "to", or the first address when it is a list. Other topics
# have no such field and get NULL.
_TO = outbox_table.c.payload["to"]
RECIPIENT = case(
    (func.jsonb_typeof(_TO) == "array", _TO[0].astext),
    else_=outbox_table.c.payload["to"].astext,
).label("recipient")


async def status(engine: AsyncEngine, *, now: datetime | None = None) -> dict[str, float]:
    async with engine.connect() as conn:
        return await queries.count_by_status(conn, now=now)


async def by_topic(engine: AsyncEngine, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Pending, retrying and dead per topic, and sent in the last hour: a topic that no running
    relay serves shows here as pending that only grows."""
    async with engine.connect() as conn:
        return await queries.count_by_topic(conn, now=now)


async def list_dead(engine: AsyncEngine, *, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently dead messages, newest first, with whom they were for and why they
    died."""
    t = outbox_table
    stmt = (
        select(
            t.c.id,
            t.c.message_id,
            t.c.topic,
            RECIPIENT,
            t.c.attempts,
            t.c.dead_at,
            t.c.last_error,
        )
        .where(t.c.dead_at.is_not(None))
        .order_by(t.c.dead_at.desc(), t.c.id.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(stmt)).mappings()]


def message_state(row: Mapping[str, Any] | RowMapping) -> str:
    """sent, dead, retrying or pending, by the rule ``outbox status`` counts with (see "The four
    states" in ``outbox.queries``): retrying means it failed at least once (``last_error`` is
    set) and will be tried again; a message on its first try is still pending."""
    if row["sent_at"] is not None:
        return "sent"
    if row["dead_at"] is not None:
        return "dead"
    return "retrying" if row["last_error"] is not None else "pending"


async def show(engine: AsyncEngine, ref: int | uuid.UUID) -> dict[str, Any] | None:
    """One message, every column, by its id or its UUID (the Message-ID a receiver saw), with
    its state and recipient; ``None`` when there is no such message."""
    t = outbox_table
    match = t.c.id == ref if isinstance(ref, int) else t.c.message_id == ref
    stmt = select(t, RECIPIENT).where(match)
    async with engine.connect() as conn:
        row = (await conn.execute(stmt)).mappings().one_or_none()
    if row is None:
        return None
    found = dict(row)
    found["state"] = message_state(found)
    return found


async def retry(
    engine: AsyncEngine, *, ids: list[int], all_dead: bool, now: datetime | None = None
) -> list[int]:
    """Make dead messages due again with a fresh attempt budget; returns the ids requeued."""
    async with engine.begin() as conn:
        return await queries.requeue_dead(conn, ids=ids, all_dead=all_dead, now=now)


async def discard(
    engine: AsyncEngine, *, ids: list[int], all_dead: bool, dead_until: datetime | None = None
) -> list[int]:
    """Delete dead messages (``ids``, or every dead one, or every one dead by ``dead_until``);
    returns the ids deleted. Messages in any other state are left alone, so a discard can never
    drop mail that may still go out."""
    async with engine.begin() as conn:
        deleted = await queries.delete_dead(conn, ids=ids, all_dead=all_dead, dead_until=dead_until)
    if deleted:
        logger.info("discarded %d dead messages", len(deleted), extra={"action": "discard_dead"})
    return deleted


async def purge(
    engine: AsyncEngine,
    *,
    older_than: timedelta,
    now: datetime | None = None,
    batch: int = PURGE_BATCH,
) -> int:
    """Delete sent messages older than ``older_than``, ``batch`` rows per short transaction."""
    async with engine.connect() as conn:
        current: datetime = now or (await conn.execute(queries.SELECT_NOW)).scalar_one()
        await conn.rollback()
        before = current - older_than
        total = 0
        while True:
            deleted = await queries.delete_sent_before(conn, before=before, limit=batch)
            await conn.commit()
            total += deleted
            if deleted < batch:
                break
    if total:
        logger.info("purged %d sent messages", total, extra={"action": "purge_sent"})
    return total
