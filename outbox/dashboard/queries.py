"""The dashboard's own reads, each explained, and each kept cheap at millions of kept rows.

The state counts come from ``outbox.admin.status`` (the same numbers as ``outbox status``); what
is here serves only the dashboard. The rule for every statement: walk one of the outbox table's
indexes and stop early, never scan the table.

- ``ix_outbox_due`` (partial: unsent and not dead, ordered by ``(available_at, id)``) serves the
  pending and retrying lists and the unsent part of the per-topic counts;
- ``ix_outbox_sent_at`` / ``ix_outbox_dead_at`` (partial, one timestamp each) serve the sent and
  dead lists, newest first, and the per-minute chart over the last hour;
- the primary key serves the list of every state (newest id first) and one message's page; the
  unique index on ``message_id`` serves a search by Message-ID.

Paging is by keyset (the last row's sort key goes into the next page's link), so page 500 costs
what page 1 costs. The first page passes a sentinel key (``-infinity``/``infinity``) instead of
a separate statement, so the key comparison is always an index condition.

A search by recipient or error text (``q``) is a filter applied while walking the list's index:
a page stops as soon as it has its rows, so a common term is quick, but a term that matches
nothing reads every row of the chosen state (about half a second per million rows here). A
Message-ID or an id is looked up through its unique index instead.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox.admin import message_state


class State(StrEnum):
    """The four states of ``outbox status``, derived from the row as ``outbox.schema`` says."""

    PENDING = "pending"
    RETRYING = "retrying"
    DEAD = "dead"
    SENT = "sent"


# Every list shows the same columns; ``payload->'to'`` is the recipient of an ``email`` message
# (a string or a list), NULL for other topics. The filters are the same too: a NULL parameter
# switches its filter off (PostgreSQL folds ``NULL IS NULL`` away when it plans with the values),
# and no filter decides which index is walked. The recipient is matched in the JSON text of
# ``payload->'to'`` (``"a@x"`` or ``["a@x", ...]``), so one ILIKE covers both shapes. Each
# statement is spelt out whole, never assembled from pieces (tests/integration/test_security.py).

# --- LIST_UNSENT ------------------------------------------------------------------------------
# Pending (never failed: last_error IS NULL) or retrying (failed at least once) messages, by the
# rule of ``outbox.queries`` ("The four states"), in the order the relay claims them, oldest due
# first: a range scan of ix_outbox_due from the cursor, stopped by LIMIT. ``:failed`` is a filter
# on the index's rows, not a second index.
LIST_UNSENT = text(
    """
    SELECT id, message_id, topic, attempts, created_at, available_at, sent_at, dead_at,
           left(last_error, 200) AS last_error, payload -> 'to' AS recipient
    FROM outbox
    WHERE sent_at IS NULL AND dead_at IS NULL
      AND (last_error IS NOT NULL) = CAST(:failed AS boolean)
      AND (available_at, id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS bigint))
      AND (CAST(:topic AS text) IS NULL OR topic = CAST(:topic AS text))
      AND (CAST(:pattern AS text) IS NULL
           OR CAST(payload -> 'to' AS text) ILIKE CAST(:pattern AS text)
           OR last_error ILIKE CAST(:pattern AS text))
    ORDER BY available_at, id
    LIMIT :limit
    """
)

# --- LIST_DEAD / LIST_SENT --------------------------------------------------------------------
# Newest first, through the partial timestamp index walked backwards from the cursor. The index
# holds the timestamp only; rows that share one (a batch settles with one ``now``) are put in id
# order by an incremental sort over that small group, not by sorting the whole state.
LIST_DEAD = text(
    """
    SELECT id, message_id, topic, attempts, created_at, available_at, sent_at, dead_at,
           left(last_error, 200) AS last_error, payload -> 'to' AS recipient
    FROM outbox
    WHERE dead_at IS NOT NULL
      AND (dead_at, id) < (CAST(:after_at AS timestamptz), CAST(:after_id AS bigint))
      AND (CAST(:topic AS text) IS NULL OR topic = CAST(:topic AS text))
      AND (CAST(:pattern AS text) IS NULL
           OR CAST(payload -> 'to' AS text) ILIKE CAST(:pattern AS text)
           OR last_error ILIKE CAST(:pattern AS text))
    ORDER BY dead_at DESC, id DESC
    LIMIT :limit
    """
)
LIST_SENT = text(
    """
    SELECT id, message_id, topic, attempts, created_at, available_at, sent_at, dead_at,
           left(last_error, 200) AS last_error, payload -> 'to' AS recipient
    FROM outbox
    WHERE sent_at IS NOT NULL
      AND (sent_at, id) < (CAST(:after_at AS timestamptz), CAST(:after_id AS bigint))
      AND (CAST(:topic AS text) IS NULL OR topic = CAST(:topic AS text))
      AND (CAST(:pattern AS text) IS NULL
           OR CAST(payload -> 'to' AS text) ILIKE CAST(:pattern AS text)
           OR last_error ILIKE CAST(:pattern AS text))
    ORDER BY sent_at DESC, id DESC
    LIMIT :limit
    """
)

# --- LIST_ALL ---------------------------------------------------------------------------------
# Every state, newest message first: a backward walk of the primary key from the cursor.
LIST_ALL = text(
    """
    SELECT id, message_id, topic, attempts, created_at, available_at, sent_at, dead_at,
           left(last_error, 200) AS last_error, payload -> 'to' AS recipient
    FROM outbox
    WHERE id < CAST(:after_id AS bigint)
      AND (CAST(:topic AS text) IS NULL OR topic = CAST(:topic AS text))
      AND (CAST(:pattern AS text) IS NULL
           OR CAST(payload -> 'to' AS text) ILIKE CAST(:pattern AS text)
           OR last_error ILIKE CAST(:pattern AS text))
    ORDER BY id DESC
    LIMIT :limit
    """
)

# --- FIND_BY_KEY ------------------------------------------------------------------------------
# A search for a Message-ID (``<uuid@host>`` or the bare UUID) or a message id: the unique index
# on message_id, or the primary key; at most two rows.
FIND_BY_KEY = text(
    """
    SELECT id, message_id, topic, attempts, created_at, available_at, sent_at, dead_at,
           left(last_error, 200) AS last_error, payload -> 'to' AS recipient
    FROM outbox
    WHERE message_id = CAST(:message_id AS uuid) OR id = CAST(:id AS bigint)
    ORDER BY id DESC
    """
)

# --- GET_MESSAGE ------------------------------------------------------------------------------
# One message's page: everything, by primary key. ``in_flight``: a relay holds it now (its
# available_at is then the claim's lease, not when it is due).
GET_MESSAGE = text(
    """
    SELECT id, message_id, topic, payload, attempts, last_error, result,
           created_at, available_at, sent_at, dead_at, claimed_by IS NOT NULL AS in_flight,
           coalesce(CAST(:now AS timestamptz), statement_timestamp()) AS now
    FROM outbox WHERE id = :id
    """
)

# --- DEAD_SUMMARY -----------------------------------------------------------------------------
# For the "all dead" confirmation: how many are dead and when the latest died, from
# ix_outbox_dead_at alone. The time goes into the confirming form, so the action touches the
# messages the operator was shown and none that died after.
DEAD_SUMMARY = text(
    """
    SELECT count(*) AS dead, max(dead_at) AS latest FROM outbox WHERE dead_at IS NOT NULL
    """
)

# --- SETTLED_PER_MINUTE -----------------------------------------------------------------------
# The chart: messages sent and messages that went dead, per minute, over the last hour (the
# current minute and the 59 before it). Each half is a range scan of its partial timestamp
# index, so the cost follows the last hour's traffic, not the table's size. Minutes with no row
# are absent; the caller fills them with zeros. ``start`` is returned so the caller lays the
# minutes out on the database's clock.
SETTLED_PER_MINUTE = text(
    """
    WITH clock AS (
        SELECT date_trunc('minute', coalesce(CAST(:now AS timestamptz), statement_timestamp()))
               - interval '59 minutes' AS start
    )
    SELECT 'sent' AS kind, date_trunc('minute', sent_at) AS minute, count(*) AS n
    FROM outbox WHERE sent_at >= (SELECT start FROM clock) GROUP BY 2
    UNION ALL
    SELECT 'dead', date_trunc('minute', dead_at), count(*)
    FROM outbox WHERE dead_at >= (SELECT start FROM clock) GROUP BY 2
    UNION ALL
    SELECT 'start', start, 0 FROM clock
    """
)

PAGE_SIZE = 50
_MIN_TIME = "-infinity"
_MAX_TIME = "infinity"
MAX_ID = 2**63 - 1
_UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts: the last row's sort time (absent for the all-states list)
    and id. Spelt ``<iso time>~<id>`` or ``<id>`` in a link."""

    at: datetime | None
    id: int

    def encode(self) -> str:
        return f"{self.at.isoformat()}~{self.id}" if self.at is not None else str(self.id)

    @classmethod
    def decode(cls, value: str) -> Cursor | None:
        """The cursor in ``value``, or ``None`` when it is not one (the first page then)."""
        at_text, sep, id_text = value.rpartition("~")
        try:
            number = int(id_text)
            at = datetime.fromisoformat(at_text) if sep else None
        except ValueError:
            return None
        if not 0 <= number <= MAX_ID or (at is not None and at.tzinfo is None):
            return None
        return cls(at, number)


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[RowMapping]
    next: Cursor | None


def like_pattern(q: str) -> str:
    """``q`` as an ILIKE substring pattern, its own ``%``, ``_`` and ``\\`` taken literally."""
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search_key(q: str) -> tuple[uuid.UUID | None, int | None]:
    """The Message-ID (a UUID anywhere in ``q``, as in ``<uuid@host>``) or the message id
    (``42`` or ``#42``) that ``q`` names, if it names one."""
    found = _UUID.search(q)
    if found:
        return uuid.UUID(found.group(0)), None
    digits = q.strip().removeprefix("#")
    if digits.isdigit() and int(digits) <= MAX_ID:
        return None, int(digits)
    return None, None


async def list_messages(
    conn: AsyncConnection,
    *,
    state: State | None,
    topic: str | None,
    q: str | None,
    after: Cursor | None,
    limit: int = PAGE_SIZE,
) -> Page:
    """One page of messages in ``state`` (all states when ``None``), in that list's order."""
    if q:
        message_id, number = search_key(q)
        if message_id is not None or number is not None:
            found = await conn.execute(FIND_BY_KEY, {"message_id": message_id, "id": number})
            return Page(list(found.mappings()), None)
    params: dict[str, Any] = {
        "topic": topic or None,
        "pattern": like_pattern(q) if q else None,
        "limit": limit + 1,  # one more than shown tells whether there is a next page
    }
    match state:
        case State.PENDING | State.RETRYING:
            statement = LIST_UNSENT
            params["failed"] = state is State.RETRYING
            params["after_at"] = after.at if after and after.at else _MIN_TIME
            params["after_id"] = after.id if after else 0
        case State.DEAD | State.SENT:
            statement = LIST_DEAD if state is State.DEAD else LIST_SENT
            params["after_at"] = after.at if after and after.at else _MAX_TIME
            params["after_id"] = after.id if after else MAX_ID
        case None:
            statement = LIST_ALL
            params["after_id"] = after.id if after else MAX_ID
    rows = list((await conn.execute(statement, params)).mappings())
    if len(rows) <= limit:
        return Page(rows, None)
    rows = rows[:limit]
    last = rows[-1]
    sort_at = {
        State.PENDING: "available_at",
        State.RETRYING: "available_at",
        State.DEAD: "dead_at",
        State.SENT: "sent_at",
    }
    at = last[sort_at[state]] if state is not None else None
    return Page(rows, Cursor(at, int(last["id"])))


async def get_message(
    conn: AsyncConnection, *, id: int, now: datetime | None = None
) -> RowMapping | None:
    return (await conn.execute(GET_MESSAGE, {"id": id, "now": now})).mappings().one_or_none()


async def dead_summary(conn: AsyncConnection) -> tuple[int, datetime | None]:
    row = (await conn.execute(DEAD_SUMMARY)).one()
    return int(row[0]), row[1]


@dataclass(frozen=True, slots=True)
class MinuteCounts:
    """Sent and dead counts of one minute (``minute`` is its start)."""

    minute: datetime
    sent: int
    dead: int


async def settled_per_minute(
    conn: AsyncConnection, *, now: datetime | None = None, minutes: int = 60
) -> list[MinuteCounts]:
    """The last ``minutes`` minutes, oldest first, every minute present (zeros filled in)."""
    from datetime import timedelta

    rows = (await conn.execute(SETTLED_PER_MINUTE, {"now": now})).all()
    start = next(minute for kind, minute, _ in rows if kind == "start")
    sent: dict[datetime, int] = {}
    dead: dict[datetime, int] = {}
    for kind, minute, n in rows:
        if kind == "sent":
            sent[minute] = int(n)
        elif kind == "dead":
            dead[minute] = int(n)
    series = []
    for i in range(minutes):
        minute = start + timedelta(minutes=i)
        series.append(MinuteCounts(minute, sent.get(minute, 0), dead.get(minute, 0)))
    return series


def state_of(row: RowMapping | dict[str, Any]) -> State:
    """The row's state, by the one rule ``outbox status`` and ``outbox show`` use."""
    return State(message_state(row))


__all__: Sequence[str] = [
    "Cursor",
    "MinuteCounts",
    "Page",
    "State",
    "dead_summary",
    "get_message",
    "list_messages",
    "settled_per_minute",
    "state_of",
]
