"""The operator's commands: status counts, dead messages, retry, discard and purge."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import queries
from outbox.schema import outbox_table

logger = logging.getLogger(__name__)

PURGE_BATCH = 1000
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"45s"`` or plain seconds; ValueError otherwise."""
    match = _DURATION.match(value.lower())
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 7d, 12h, 30m or 45s)")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


async def status(engine: AsyncEngine, *, now: datetime | None = None) -> dict[str, float]:
    async with engine.connect() as conn:
        return await queries.count_by_status(conn, now=now)


async def list_dead(engine: AsyncEngine, *, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently dead messages, newest first, with why they died."""
    t = outbox_table
    stmt = (
        select(t.c.id, t.c.message_id, t.c.topic, t.c.attempts, t.c.dead_at, t.c.last_error)
        .where(t.c.dead_at.is_not(None))
        .order_by(t.c.dead_at.desc(), t.c.id.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(stmt)).mappings()]


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
