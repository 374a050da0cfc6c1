"""Every statement on the relay's hot path, written once and explained here.

Each entry says what it does, which index it relies on and why it is safe when several relays run
at once. Time is always a parameter (``:now``) so tests drive a clock instead of sleeping;
``None`` means the database's own clock (``statement_timestamp()``), which is what production
uses so that relays on several machines agree with each other and with the writers' ``now()``.

The relay holds the row locks of a claimed batch for the whole send (one transaction per batch):
there is no "claimed" state to write and no lease to expire. A relay that dies drops its
connection, PostgreSQL rolls the transaction back, and the rows are due again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox.message import OutboxMessage
from outbox.schema import NOTIFY_CHANNEL

# --- INSERT_MESSAGE ---------------------------------------------------------------------------
# One round trip: insert, and (optionally) queue a NOTIFY that PostgreSQL delivers only if and when
# the caller's transaction commits; a rollback discards both. NOTIFY payloads are de-duplicated
# within a transaction, so a handler that enqueues many messages wakes the relay once.
INSERT_MESSAGE = text(
    """
    INSERT INTO outbox (topic, payload, available_at)
    VALUES (:topic, CAST(:payload AS jsonb), coalesce(CAST(:available_at AS timestamptz), now()))
    RETURNING message_id
    """
)
INSERT_MESSAGE_NOTIFY = text(
    """
    WITH inserted AS (
        INSERT INTO outbox (topic, payload, available_at)
        VALUES (:topic, CAST(:payload AS jsonb),
                coalesce(CAST(:available_at AS timestamptz), now()))
        RETURNING message_id
    )
    SELECT message_id, pg_notify(:channel, '') FROM inserted
    """
)

# --- INSERT_DEDUPED / SELECT_BY_DEDUPE_KEY ----------------------------------------------------
# enqueue(..., dedupe_key=K): uq_outbox_dedupe_key (partial: only rows with a key) makes a second
# row with K a conflict, which DO NOTHING turns into "no row returned". The existing message's
# UUID then needs a statement of its own: when the conflicting row was committed by a concurrent
# transaction that this INSERT waited for, only a new statement's snapshot sees it (READ
# COMMITTED; under REPEATABLE READ PostgreSQL raises a serialization failure instead). The NOTIFY
# is queued only when a row was inserted. Messages without a key keep INSERT_MESSAGE: no
# speculative insertion on the common path.
INSERT_DEDUPED = text(
    """
    INSERT INTO outbox (topic, payload, available_at, dedupe_key)
    VALUES (:topic, CAST(:payload AS jsonb), coalesce(CAST(:available_at AS timestamptz), now()),
            :dedupe_key)
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING message_id
    """
)
INSERT_DEDUPED_NOTIFY = text(
    """
    WITH inserted AS (
        INSERT INTO outbox (topic, payload, available_at, dedupe_key)
        VALUES (:topic, CAST(:payload AS jsonb),
                coalesce(CAST(:available_at AS timestamptz), now()), :dedupe_key)
        ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
        RETURNING message_id
    )
    SELECT message_id, pg_notify(:channel, '') FROM inserted
    """
)
SELECT_BY_DEDUPE_KEY = text("SELECT message_id FROM outbox WHERE dedupe_key = :dedupe_key")


@dataclass(frozen=True, slots=True)
class Insert:
    """One enqueue, as statements and parameters any driver can run (see ``outbox.enqueue``)."""

    statement: TextClause
    params: dict[str, Any]

    @classmethod
    def of(
        cls,
        *,
        topic: str,
        payload: Any,
        available_at: datetime | None,
        notify: bool,
        dedupe_key: str | None,
    ) -> Insert:
        params: dict[str, Any] = {
            "topic": topic,
            "payload": json.dumps(payload),
            "available_at": available_at,
        }
        if notify:
            params["channel"] = NOTIFY_CHANNEL
        if dedupe_key is None:
            return cls(INSERT_MESSAGE_NOTIFY if notify else INSERT_MESSAGE, params)
        params["dedupe_key"] = dedupe_key
        return cls(INSERT_DEDUPED_NOTIFY if notify else INSERT_DEDUPED, params)

    @property
    def existing(self) -> tuple[TextClause, dict[str, Any]] | None:
        """The look-up to run when the INSERT returned no row (only with a ``dedupe_key``)."""
        if "dedupe_key" not in self.params:
            return None
        return SELECT_BY_DEDUPE_KEY, {"dedupe_key": self.params["dedupe_key"]}


# --- SELECT_NOW -------------------------------------------------------------------------------
# The database's clock, for a drain that must fix "due now" once at its start.
SELECT_NOW = text("SELECT statement_timestamp()")


# --- CLAIM_DUE / CLAIM_DUE_AFTER ---------------------------------------------------------------
# The oldest due rows, locked for this transaction. Walks ix_outbox_due (partial on "unsent and not
# dead") in (available_at, id) order and stops after :limit rows, so its cost does not grow with
# the number of sent rows kept. SKIP LOCKED makes concurrent relays take disjoint batches instead
# of queueing behind each other's locks; a row is never handed to two relays at once.
#
# CLAIM_DUE_AFTER is the same claim started where the previous batch stopped, for draining a
# backlog. Rows settled since the last VACUUM leave dead entries at the front of ix_outbox_due
# that every claim from the start must step over (measured: 500,000 of them make a claim of 100
# rows read ~1,900 index pages and take ~5 ms instead of 0.2 ms); the row comparison is an index
# condition, so this claim descends straight to its starting point. ``outbox.claim`` decides when
# a claim may start there, and how rows behind that point are still found.
CLAIM_DUE = text(
    """
    SELECT id, message_id, topic, payload, attempts, created_at, available_at
    FROM outbox
    WHERE sent_at IS NULL AND dead_at IS NULL
      AND available_at <= coalesce(CAST(:now AS timestamptz), statement_timestamp())
    ORDER BY available_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)
CLAIM_DUE_AFTER = text(
    """
    SELECT id, message_id, topic, payload, attempts, created_at, available_at
    FROM outbox
    WHERE sent_at IS NULL AND dead_at IS NULL
      AND available_at <= coalesce(CAST(:now AS timestamptz), statement_timestamp())
      AND (available_at, id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS bigint))
    ORDER BY available_at, id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)


@dataclass(frozen=True, slots=True)
class ClaimPosition:
    """A point in ix_outbox_due's (available_at, id) order: where a claim stopped."""

    available_at: datetime
    id: int


async def claim_due(
    conn: AsyncConnection,
    *,
    limit: int,
    now: datetime | None,
    after: ClaimPosition | None = None,
) -> tuple[list[OutboxMessage], ClaimPosition | None]:
    """The claimed rows, and the position of the last one (``None`` when none was claimed)."""
    if after is None:
        result = await conn.execute(CLAIM_DUE, {"limit": limit, "now": now})
    else:
        params = {"limit": limit, "now": now, "after_at": after.available_at, "after_id": after.id}
        result = await conn.execute(CLAIM_DUE_AFTER, params)
    rows = result.all()
    if not rows:
        return [], None
    last = rows[-1]
    return [OutboxMessage(*row[:6]) for row in rows], ClaimPosition(last[6], last[0])


# --- MARK_SENT_MANY / MARK_RETRY_MANY / MARK_DEAD_MANY ----------------------------------------
# Settle a batch with one statement per outcome kind, the rows passed as parallel arrays and
# joined by primary key. Safe without re-checking state: this transaction still holds the row
# locks taken by CLAIM_DUE, so nobody else can have settled them. ``attempts`` counts every
# attempt, successful or not.
MARK_SENT_MANY = text(
    """
    UPDATE outbox AS o
    SET sent_at = coalesce(CAST(:now AS timestamptz), statement_timestamp()),
        attempts = o.attempts + 1,
        result = u.result
    FROM unnest(CAST(:ids AS bigint[]), CAST(:results AS text[])) AS u(id, result)
    WHERE o.id = u.id
    """
)
MARK_RETRY_MANY = text(
    """
    UPDATE outbox AS o
    SET attempts = o.attempts + 1,
        available_at = coalesce(CAST(:now AS timestamptz), statement_timestamp())
                       + make_interval(secs => u.delay),
        last_error = u.error
    FROM unnest(CAST(:ids AS bigint[]), CAST(:delays AS float8[]), CAST(:errors AS text[]))
         AS u(id, delay, error)
    WHERE o.id = u.id
    """
)
MARK_DEAD_MANY = text(
    """
    UPDATE outbox AS o
    SET dead_at = coalesce(CAST(:now AS timestamptz), statement_timestamp()),
        attempts = o.attempts + 1,
        last_error = u.error
    FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[])) AS u(id, error)
    WHERE o.id = u.id
    """
)


async def mark_sent_many(
    conn: AsyncConnection,
    *,
    ids: Sequence[int],
    results: Sequence[str | None],
    now: datetime | None,
) -> None:
    if ids:
        await conn.execute(MARK_SENT_MANY, {"ids": list(ids), "results": list(results), "now": now})


async def mark_retry_many(
    conn: AsyncConnection,
    *,
    ids: Sequence[int],
    delays: Sequence[float],
    errors: Sequence[str],
    now: datetime | None,
) -> None:
    if ids:
        await conn.execute(
            MARK_RETRY_MANY,
            {"ids": list(ids), "delays": list(delays), "errors": list(errors), "now": now},
        )


async def mark_dead_many(
    conn: AsyncConnection, *, ids: Sequence[int], errors: Sequence[str], now: datetime | None
) -> None:
    if ids:
        await conn.execute(MARK_DEAD_MANY, {"ids": list(ids), "errors": list(errors), "now": now})


# --- COUNT_BY_STATUS --------------------------------------------------------------------------
# For `outbox status` and the metrics: one pass over the table. oldest_pending_age_s is how long
# the oldest due, unsent message has been waiting since it became due (0 when none is due), the
# figure to alert on: it grows when relays are down or cannot keep up.
COUNT_BY_STATUS = text(
    """
    WITH clock AS (SELECT coalesce(CAST(:now AS timestamptz), statement_timestamp()) AS now)
    SELECT
        count(*) FILTER (WHERE sent_at IS NULL AND dead_at IS NULL AND attempts = 0) AS pending,
        count(*) FILTER (WHERE sent_at IS NULL AND dead_at IS NULL AND attempts > 0) AS retrying,
        count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead,
        count(*) FILTER (WHERE sent_at IS NOT NULL) AS sent,
        coalesce(extract(epoch FROM (SELECT now FROM clock) - min(available_at) FILTER (
            WHERE sent_at IS NULL AND dead_at IS NULL
              AND available_at <= (SELECT now FROM clock))), 0)
            AS oldest_pending_age_s
    FROM outbox
    """
)


async def count_by_status(conn: AsyncConnection, *, now: datetime | None) -> dict[str, float]:
    row = (await conn.execute(COUNT_BY_STATUS, {"now": now})).mappings().one()
    return {
        "pending": int(row["pending"]),
        "retrying": int(row["retrying"]),
        "dead": int(row["dead"]),
        "sent": int(row["sent"]),
        "oldest_pending_age_s": round(float(row["oldest_pending_age_s"]), 3),
    }


# --- DUE_DEPTH --------------------------------------------------------------------------------
# For the relay's gauges, sampled every few seconds: the due count and the oldest due time come
# from ix_outbox_due (partial, so sent rows cost nothing), the dead count from ix_outbox_dead_at.
DUE_DEPTH = text(
    """
    WITH clock AS (SELECT coalesce(CAST(:now AS timestamptz), statement_timestamp()) AS now),
    due AS (
        SELECT count(*) AS n, min(available_at) AS oldest FROM outbox
        WHERE sent_at IS NULL AND dead_at IS NULL AND available_at <= (SELECT now FROM clock)
    )
    SELECT due.n AS due,
           coalesce(extract(epoch FROM (SELECT now FROM clock) - due.oldest), 0) AS oldest,
           (SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL) AS dead
    FROM due
    """
)


async def due_depth(conn: AsyncConnection, *, now: datetime | None) -> dict[str, float]:
    row = (await conn.execute(DUE_DEPTH, {"now": now})).mappings().one()
    return {
        "due": int(row["due"]),
        "oldest_due_age_s": float(row["oldest"]),
        "dead": int(row["dead"]),
    }


# --- REQUEUE_DEAD -----------------------------------------------------------------------------
# `outbox retry`: make dead rows due now with a fresh attempt budget. last_error is kept so the
# history of why it died stays visible until the next attempt overwrites it.
REQUEUE_DEAD = text(
    """
    UPDATE outbox
    SET dead_at = NULL,
        attempts = 0,
        available_at = coalesce(CAST(:now AS timestamptz), statement_timestamp())
    WHERE dead_at IS NOT NULL AND (CAST(:all_dead AS boolean) OR id = ANY(CAST(:ids AS bigint[])))
    RETURNING id
    """
)


async def requeue_dead(
    conn: AsyncConnection, *, ids: Sequence[int], all_dead: bool, now: datetime | None
) -> list[int]:
    result = await conn.execute(REQUEUE_DEAD, {"ids": list(ids), "all_dead": all_dead, "now": now})
    return sorted(row[0] for row in result)


# --- DELETE_SENT_BEFORE -----------------------------------------------------------------------
# Purge in small batches: each statement deletes at most :limit sent rows found through
# ix_outbox_sent_at and commits, so no purge holds many row locks or a long transaction. SKIP
# LOCKED keeps it from waiting on anything else that touches those rows.
DELETE_SENT_BEFORE = text(
    """
    DELETE FROM outbox
    WHERE id IN (
        SELECT id FROM outbox
        WHERE sent_at IS NOT NULL AND sent_at < :before
        ORDER BY sent_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    """
)


async def delete_sent_before(conn: AsyncConnection, *, before: datetime, limit: int) -> int:
    result = await conn.execute(DELETE_SENT_BEFORE, {"before": before, "limit": limit})
    return int(result.rowcount)


# --- MISSING_TABLES ---------------------------------------------------------------------------
# Which of :names the database lacks: the CLI, the relay and /healthz ask before they rely on a
# table, so an unmigrated database is "run outbox migrate", not a traceback or a bare 500 later.
# to_regclass resolves a name through search_path as the queries do, needs no privilege on the
# table (the least-privilege web role may not SELECT from outbox) and answers from the catalogue.
MISSING_TABLES = text(
    "SELECT name FROM unnest(CAST(:names AS text[])) AS name WHERE to_regclass(name) IS NULL"
)


async def missing_tables(conn: AsyncConnection, names: Sequence[str]) -> list[str]:
    result = await conn.execute(MISSING_TABLES, {"names": list(names)})
    return [row[0] for row in result]
