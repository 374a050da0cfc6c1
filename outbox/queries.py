"""Every statement on the relay's hot path, written once and explained here.

Each entry says what it does, which index it relies on and why it is safe when several relays run
at once. Time is always a parameter (``:now``) so tests drive a clock instead of sleeping;
``None`` means the database's own clock (``statement_timestamp()``), which is what production
uses so that relays on several machines agree with each other and with the writers' ``now()``.

Every statement the relay runs is a short transaction of its own: a claim records who claimed a
row and until when (``claimed_by`` and the lease in ``available_at``) and commits before any
handler runs; settles are fenced by that owner. No transaction is open while a handler runs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
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


# --- SELECT_BACKEND_PID -------------------------------------------------------------------------
# The server process behind this connection. ``enqueue`` compares it, once per connection, with
# the process id the connection was given at startup: a pooler (PgBouncer) gives one of its own,
# and behind a transaction pooler the insert must not become a server-side prepared statement.
SELECT_BACKEND_PID = text("SELECT pg_backend_pid()")


# --- SELECT_NOW -------------------------------------------------------------------------------
# The database's clock, for a drain that must fix "due now" once at its start.
SELECT_NOW = text("SELECT statement_timestamp()")


# --- CLAIM_DUE / CLAIM_DUE_AFTER ---------------------------------------------------------------
# Claim the oldest due rows of the topics this relay serves, in one statement that is a
# transaction of its own (the relay runs it in autocommit: no BEGIN or COMMIT round trip): the
# inner SELECT walks ix_outbox_due (partial on "unsent and not dead") in (available_at, id)
# order, stops after :limit rows and locks them (SKIP LOCKED: concurrent relays take disjoint
# rows instead of queueing); the UPDATE records the claim and the statement commits at once, so
# no lock is held while the handlers run.
#
# The claim stamps three things. ``attempts + 1``: an attempt counts when it starts, so a message
# that kills the relay spends its attempts too. ``claimed_by``: the relay's owner id, the fence
# every later write of this claim checks. ``available_at = now + :lease``: the lease. A claimed
# row is simply not due until its lease runs out, so the due index needs no extra condition and a
# claim never steps over rows in flight; the heartbeat pushes the lease forward while a handler
# runs. Rows of other topics are left alone (no attempt spent) for a relay that serves them.
# ``claimed_by IS NULL`` is a filter on the few rows whose lease ran out unsettled (abandoned):
# those are claimed one at a time by CLAIM_ABANDONED.
#
# The claim commits asynchronously (``synchronous_commit = off`` for its own transaction only,
# set by the statement itself, so it holds behind PgBouncer too): it returns without waiting for
# the WAL flush, the one wait left between a NOTIFY and the handler. Why that is safe: an async
# commit is visible to every session at once, so a relay that crashes, and every other relay,
# sees the claim exactly as after a synchronous one. Only a crash of PostgreSQL itself within
# about three ``wal_writer_delay`` (0.6 s by default) can lose it: the row then comes back
# unclaimed with its old ``attempts``, and is run again with the same attempt number, which is
# at-least-once as before (a handler may run twice; a Message-ID is the same both times). The
# settle that follows commits synchronously, and its flush covers the claim's WAL too.
#
# CLAIM_DUE_AFTER is the same claim started where the previous claim stopped, for draining a
# backlog. Rows settled (or claimed) since the last VACUUM leave dead entries at the front of
# ix_outbox_due that every claim from the start must step over (measured: 500,000 of them make a
# claim of 100 rows read ~1,900 index pages and take ~5 ms instead of 0.2 ms); the row comparison
# is an index condition, so this claim descends straight to its starting point. ``outbox.claim``
# decides when a claim may start there, and how rows behind that point are still found.
#
# ``:now`` is the due cutoff (a drain fixes it at its start); ``:clock`` is the time the lease runs
# from (``None``: the database's clock), so a long drain's leases are not already over.
#
# ``:budget`` bounds the payload bytes a claim takes (their stored size, ``pg_column_size``): rows
# are taken in order while the bytes before them stay under the budget, so a claim takes at least
# one row and at most budget + one row's bytes. The relay passes what is left of its
# ``max_bytes_in_flight``, so its memory follows bytes in flight, not rows: a batch of a hundred
# 10 MB messages no longer lands in one process at once. Candidates past the budget were locked
# for this short transaction only and stay due.
#
# The rows come back as a handler sees them plus their *old* available_at (the claim's position
# in the index, for the resume point, and where a released row goes back to), in index order
# (RETURNING alone is unordered; sorting here costs less than in Python).
CLAIM_DUE = text(
    """
    WITH async_commit AS MATERIALIZED (
        SELECT set_config('synchronous_commit', 'off', true) AS setting
    ),
    candidates AS (
        SELECT id, available_at, pg_column_size(payload) AS size FROM outbox
        WHERE sent_at IS NULL AND dead_at IS NULL
          AND available_at <= coalesce(CAST(:now AS timestamptz), statement_timestamp())
          AND claimed_by IS NULL
          AND topic = ANY(CAST(:topics AS text[]))
        ORDER BY available_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ),
    picked AS (
        SELECT id, available_at, size FROM (
            SELECT id, available_at, size,
                   sum(size) OVER (ORDER BY available_at, id) - size AS before
            FROM candidates
        ) AS c
        WHERE before < :budget
    ),
    claimed AS (
        UPDATE outbox AS o
        SET attempts = o.attempts + 1,
            claimed_by = CAST(:owner AS uuid),
            available_at = coalesce(CAST(:clock AS timestamptz), statement_timestamp())
                           + make_interval(secs => CAST(:lease AS float8))
        FROM picked, async_commit
        WHERE o.id = picked.id AND async_commit.setting = 'off'
        RETURNING o.id, o.message_id, o.topic, CAST(o.payload AS text), o.attempts, o.created_at,
                  picked.available_at AS position, picked.size
    )
    SELECT * FROM claimed ORDER BY position, id
    """
)
# The same, from the resume point.
CLAIM_DUE_AFTER = text(
    """
    WITH async_commit AS MATERIALIZED (
        SELECT set_config('synchronous_commit', 'off', true) AS setting
    ),
    candidates AS (
        SELECT id, available_at, pg_column_size(payload) AS size FROM outbox
        WHERE sent_at IS NULL AND dead_at IS NULL
          AND available_at <= coalesce(CAST(:now AS timestamptz), statement_timestamp())
          AND (available_at, id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS bigint))
          AND claimed_by IS NULL
          AND topic = ANY(CAST(:topics AS text[]))
        ORDER BY available_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ),
    picked AS (
        SELECT id, available_at, size FROM (
            SELECT id, available_at, size,
                   sum(size) OVER (ORDER BY available_at, id) - size AS before
            FROM candidates
        ) AS c
        WHERE before < :budget
    ),
    claimed AS (
        UPDATE outbox AS o
        SET attempts = o.attempts + 1,
            claimed_by = CAST(:owner AS uuid),
            available_at = coalesce(CAST(:clock AS timestamptz), statement_timestamp())
                           + make_interval(secs => CAST(:lease AS float8))
        FROM picked, async_commit
        WHERE o.id = picked.id AND async_commit.setting = 'off'
        RETURNING o.id, o.message_id, o.topic, CAST(o.payload AS text), o.attempts, o.created_at,
                  picked.available_at AS position, picked.size
    )
    SELECT * FROM claimed ORDER BY position, id
    """
)

# --- CLAIM_ABANDONED --------------------------------------------------------------------------
# One suspect row: in flight in two relays that died (RESCUE_ABANDONED made it due at once,
# keeping ``claimed_by``), or whose dead owner's lease simply ran out. Such a row may be the one
# that kills relays, so it is claimed alone and the relay runs it with nothing
# else in flight: if it kills this relay too, it takes no batch-mate with it (see
# ``Relay._run_abandoned``). ix_outbox_claimed holds only the rows in flight, so this costs the
# same whatever the backlog. ``:held`` are the
# rows this relay is running itself. Rows out of attempts are not claimed: the rescue buries them.
CLAIM_ABANDONED = text(
    """
    WITH picked AS (
        SELECT id, available_at, pg_column_size(payload) AS size FROM outbox
        WHERE claimed_by IS NOT NULL AND sent_at IS NULL AND dead_at IS NULL
          AND available_at <= coalesce(CAST(:now AS timestamptz), statement_timestamp())
          AND topic = ANY(CAST(:topics AS text[]))
          AND attempts < :max_attempts
          AND NOT id = ANY(CAST(:held AS bigint[]))
        ORDER BY available_at, id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox AS o
    SET attempts = o.attempts + 1,
        claimed_by = CAST(:owner AS uuid),
        available_at = coalesce(CAST(:clock AS timestamptz), statement_timestamp())
                       + make_interval(secs => CAST(:lease AS float8))
    FROM picked
    WHERE o.id = picked.id
    RETURNING o.id, o.message_id, o.topic, CAST(o.payload AS text), o.attempts, o.created_at,
              picked.available_at, picked.size
    """
)  # one row: RETURNING needs no order


@dataclass(frozen=True, slots=True)
class ClaimPosition:
    """A point in ix_outbox_due's (available_at, id) order: where a claim stopped."""

    available_at: datetime
    id: int


@dataclass(slots=True)
class Claimed:
    """A claimed row: the message, the attempt the claim counted, and where it sat in the index.

    Made once per message on the relay's hot path, so it is a plain (not frozen) dataclass, and
    its place in the index is kept as the old ``available_at`` alone: a frozen dataclass pays one
    ``object.__setattr__`` per field, and ``position`` is only read for a batch's last row.
    """

    message: OutboxMessage
    attempt: int
    available_at: datetime  # before the claim: where the row sat, and goes back to if released
    size: int = 0  # the payload's stored bytes

    @property
    def position(self) -> ClaimPosition:
        return ClaimPosition(self.available_at, self.message.id)


@dataclass(frozen=True, slots=True)
class ClaimOwner:
    """Who claims: the relay's owner id, its lease and the topics it serves."""

    owner: uuid.UUID
    lease: float
    topics: Sequence[str]


def _claimed(rows: Sequence[Any]) -> list[Claimed]:
    """The claimed rows as the relay carries them.

    Payloads come back as text and are parsed in one go, as one JSON array: psycopg's jsonb
    loader is a Python call and a parse per row, measured at eight times the cost on no-op
    payloads (1.2 ms against 0.14 ms for 1,000 rows) and twice on a typical mail's.
    """
    payloads = json.loads("[" + ",".join([r[3] for r in rows]) + "]") if rows else []
    # The handler sees ``attempts`` as the failures before this attempt (its old meaning).
    return [
        Claimed(OutboxMessage(r[0], r[1], r[2], payload, r[4] - 1, r[5]), r[4], r[6], int(r[7]))
        for r, payload in zip(rows, payloads, strict=True)
    ]


async def claim_due(
    conn: AsyncConnection,
    *,
    limit: int,
    now: datetime | None,
    claimer: ClaimOwner,
    after: ClaimPosition | None = None,
    clock: datetime | None = None,
    budget: int = 2**62,
) -> list[Claimed]:
    """Claim up to ``limit`` rows due at ``now`` for ``claimer``, in index order, leased from
    ``clock``. The caller commits."""
    params: dict[str, Any] = {
        "limit": limit,
        "now": now,
        "clock": clock,
        "budget": budget,
        "owner": claimer.owner,
        "lease": claimer.lease,
        "topics": list(claimer.topics),
    }
    if after is None:
        result = await conn.execute(CLAIM_DUE, params)
    else:
        params |= {"after_at": after.available_at, "after_id": after.id}
        result = await conn.execute(CLAIM_DUE_AFTER, params)
    return _claimed(result.all())


async def claim_abandoned(
    conn: AsyncConnection,
    *,
    now: datetime | None,
    claimer: ClaimOwner,
    max_attempts: int,
    held: Sequence[int],
) -> Claimed | None:
    result = await conn.execute(
        CLAIM_ABANDONED,
        {
            "now": now,
            "clock": now,
            "owner": claimer.owner,
            "lease": claimer.lease,
            "topics": list(claimer.topics),
            "max_attempts": max_attempts,
            "held": list(held),
        },
    )
    claimed = _claimed(result.all())
    return claimed[0] if claimed else None


# --- SETTLE_MANY ------------------------------------------------------------------------------
# Settle many outcomes with one UPDATE per kind (sent, retry, dead, release), the rows passed as
# parallel arrays and joined by primary key. Each row is *fenced*: it is written only if it is still
# claimed by the owner and attempt that ran it, and not settled. A relay whose rows were taken over
# (it froze or was cut off past its lease, and another relay claimed them) therefore cannot record
# an outcome for them: its UPDATE matches zero rows, and RETURNING tells the caller which outcomes
# were refused. ``attempts`` is not touched: the claim counted the attempt. ``claimed_by`` is
# cleared, which also takes the row out of ix_outbox_claimed. A row with ``claimed_by`` set is never
# sent or dead (every settle clears it), so the fence needs no "unsettled" test; leaving it out
# keeps these statements off ix_outbox_claimed: with it, a prepared (generic) plan scanned that
# index once per outcome, and a settle of 4,000 outcomes took 5 s instead of 30 ms (measured).
#
# ``release`` hands back claims that never started (a stop): the attempt is given back and the row
# returns to its old place in the due order, due at once.
#
# The four UPDATEs are one statement (a data-modifying CTE each, on disjoint rows: a relay holds
# one claim per row), which the relay runs in autocommit: a group of outcomes is written
# atomically in one round trip, with no BEGIN or COMMIT. A kind with no outcome passes empty
# arrays and its UPDATE joins nothing. The commit is synchronous: a settle that is reported (a
# "sent" line) is on disk. ``settle_params`` spells the arguments.
SETTLE_KINDS: dict[str, tuple[str, ...]] = {
    "sent": ("results",),
    "retry": ("delays", "errors"),
    "dead": ("errors",),
    "release": ("available_ats",),
}
SETTLE_MANY = text(
    """
    WITH sent AS (
        UPDATE outbox AS o
        SET sent_at = coalesce(CAST(:now AS timestamptz), statement_timestamp()),
            result = u.result,
            claimed_by = NULL
        FROM unnest(CAST(:sent_ids AS bigint[]), CAST(:sent_owners AS uuid[]),
                    CAST(:sent_attempts AS int[]), CAST(:sent_results AS text[]))
             AS u(id, owner, attempt, result)
        WHERE o.id = u.id AND o.claimed_by = u.owner AND o.attempts = u.attempt
        RETURNING o.id
    ),
    retry AS (
        UPDATE outbox AS o
        SET available_at = coalesce(CAST(:now AS timestamptz), statement_timestamp())
                           + make_interval(secs => u.delay),
            last_error = u.error,
            claimed_by = NULL
        FROM unnest(CAST(:retry_ids AS bigint[]), CAST(:retry_owners AS uuid[]),
                    CAST(:retry_attempts AS int[]),
                    CAST(:retry_delays AS float8[]), CAST(:retry_errors AS text[]))
             AS u(id, owner, attempt, delay, error)
        WHERE o.id = u.id AND o.claimed_by = u.owner AND o.attempts = u.attempt
        RETURNING o.id
    ),
    dead AS (
        UPDATE outbox AS o
        SET dead_at = coalesce(CAST(:now AS timestamptz), statement_timestamp()),
            last_error = u.error,
            claimed_by = NULL
        FROM unnest(CAST(:dead_ids AS bigint[]), CAST(:dead_owners AS uuid[]),
                    CAST(:dead_attempts AS int[]), CAST(:dead_errors AS text[]))
             AS u(id, owner, attempt, error)
        WHERE o.id = u.id AND o.claimed_by = u.owner AND o.attempts = u.attempt
        RETURNING o.id
    ),
    release AS (
        UPDATE outbox AS o
        SET attempts = o.attempts - 1,
            available_at = u.available_at,
            claimed_by = NULL
        FROM unnest(CAST(:release_ids AS bigint[]), CAST(:release_owners AS uuid[]),
                    CAST(:release_attempts AS int[]),
                    CAST(:release_available_ats AS timestamptz[]))
             AS u(id, owner, attempt, available_at)
        WHERE o.id = u.id AND o.claimed_by = u.owner AND o.attempts = u.attempt
        RETURNING o.id
    )
    SELECT id FROM sent UNION ALL SELECT id FROM retry
    UNION ALL SELECT id FROM dead UNION ALL SELECT id FROM release
    """
)


def settle_params(now: datetime | None, **kinds: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """SETTLE_MANY's parameters. ``kinds`` maps each kind of ``SETTLE_KINDS`` (a missing one is
    empty) to its columns: ``ids``, ``owners``, ``attempts`` and the kind's own, as parallel
    sequences. The keys go as array literals (see ``array_literal``)."""
    params: dict[str, Any] = {"now": now}
    for kind, own in SETTLE_KINDS.items():
        columns = kinds.get(kind, {})
        params[f"{kind}_ids"] = array_literal(columns.get("ids", ()))
        params[f"{kind}_owners"] = array_literal(columns.get("owners", ()))
        params[f"{kind}_attempts"] = array_literal(columns.get("attempts", ()))
        for name in own:
            params[f"{kind}_{name}"] = list(columns.get(name, ()))
    return params


async def settle_many(
    conn: AsyncConnection,
    *,
    now: datetime | None,
    **kinds: Mapping[str, Sequence[Any]],
) -> set[int]:
    """Run SETTLE_MANY (see ``settle_params``); returns the ids it wrote (the rest were
    refused)."""
    if not any(columns.get("ids") for columns in kinds.values()):
        return set()
    result = await conn.execute(SETTLE_MANY, settle_params(now, **kinds))
    return {row[0] for row in result}


def array_literal(values: Sequence[int | uuid.UUID]) -> str:
    """``values`` (integers or UUIDs) as one PostgreSQL array literal, ``{1,2,3}``.

    For the per-message keys of a settle (ids, owners, attempts): psycopg adapts a list element
    by element in Python, measured at about four times the cost of formatting the literal (most
    of it the UUIDs, which are one or two distinct owners repeated, so each is formatted once).
    The statement casts the text to its array type. Only for values whose text needs no
    quoting: never for free text such as errors or results.
    """
    if values and isinstance(values[0], uuid.UUID):
        text = {value: str(value) for value in set(values)}
        return "{" + ",".join([text[value] for value in values]) + "}"
    return "{" + ",".join(map(str, values)) + "}"


# --- HEARTBEAT --------------------------------------------------------------------------------
# Extend the lease of every row this relay is running, in one statement, every lease/3 seconds:
# a handler may run for as long as it likes without its row becoming due for another relay. Fenced
# like the settles: a row another relay took over is not touched. SKIP LOCKED: a row locked right
# now is being settled (by this relay's completer), and locking the rows in whatever order the
# join yields while the completer does the same deadlocked (measured, SQLSTATE 40P01).
HEARTBEAT = text(
    """
    WITH mine AS (
        SELECT o.id
        FROM outbox AS o
        JOIN unnest(CAST(:ids AS bigint[]), CAST(:owners AS uuid[]), CAST(:attempts AS int[]))
             AS u(id, owner, attempt)
          ON o.id = u.id AND o.claimed_by = u.owner AND o.attempts = u.attempt
        FOR UPDATE OF o SKIP LOCKED
    )
    UPDATE outbox AS o
    SET available_at = coalesce(CAST(:now AS timestamptz), statement_timestamp())
                       + make_interval(secs => CAST(:lease AS float8))
    FROM mine
    WHERE o.id = mine.id
    """
)


async def heartbeat(
    conn: AsyncConnection,
    *,
    ids: Sequence[int],
    owners: Sequence[uuid.UUID],
    attempts: Sequence[int],
    lease: float,
    now: datetime | None,
) -> None:
    if ids:
        params = {
            "ids": list(ids),
            "owners": list(owners),
            "attempts": list(attempts),
            "lease": lease,
            "now": now,
        }
        await conn.execute(HEARTBEAT, params)


# --- OWNER_LOCK / OWNER_LOCK_PROBE / OWNERS_IN_FLIGHT / RESCUE_ABANDONED ----------------------
# Crash detection in about a second. Each relay holds a session-level advisory lock keyed by its
# owner id (``outbox.ownership.lock_key``) on a connection of its own; PostgreSQL releases it the
# moment that session ends, whether the process exited, was killed or lost its connection. Once a
# second a relay lists the owners of the rows in flight (OWNERS_IN_FLIGHT, ix_outbox_claimed) and
# probes each other owner's lock (OWNER_LOCK_PROBE, released at once when it was free): a free
# lock means the owner is gone, and RESCUE_ABANDONED makes its rows due now. A frozen or cut-off
# relay keeps its session for a while, so its rows come back when their lease runs out instead.
# An owner id is never reused (a relay that loses its lock session takes a new one), so "lock
# free" stays true once seen. These run on the lock session, in autocommit (psycopg placeholders).
OWNER_LOCK = "SELECT pg_try_advisory_lock(%(key)s)"
# One round trip for all the owners probed: the keys whose lock was free (taken, then let go;
# CASE fixes that order, which AND would leave to the planner). With no key it still proves the
# lock session alive.
OWNER_LOCK_PROBE = (
    "SELECT key FROM unnest(CAST(%(keys)s AS bigint[])) AS key"
    " WHERE CASE WHEN pg_try_advisory_lock(key) THEN pg_advisory_unlock(key) ELSE false END"
)
OWNERS_IN_FLIGHT = text(
    "SELECT DISTINCT claimed_by FROM outbox "
    "WHERE claimed_by IS NOT NULL AND sent_at IS NULL AND dead_at IS NULL"
)
# Two kinds of abandoned rows, for the rows this relay does not hold itself:
# - the owner is dead (in :dead, its lock was free): the row is due at once, with the reason in
#   last_error. The first time, it is released like any other row: most rows of a dead relay are
#   innocent (it was killed, or another message killed it), and running each of them alone would
#   take a dead relay's hundred claimed rows one by one. A row whose last_error already says its
#   relay died (it was in flight in two relays that died) keeps ``claimed_by`` as the mark
#   "suspect": it may be what kills relays, so it is claimed alone (CLAIM_ABANDONED) and a third
#   crash costs no batch-mate a duplicate. Written once per rescue (the condition on
#   available_at / last_error), not on every tick.
# - the owner is alive but its lease ran out (frozen, cut off, or a claim whose commit it never
#   saw): the claim is released (``claimed_by`` cleared, the attempt stays spent), and the row is
#   claimed like any other, at the place its lease gave it in the due order.
# Either way a row with no attempt left is dead instead, with the reason: a message that kills
# every relay that runs it ends after --max-attempts crashes.
RELAY_DIED = "relay died while handling it"
LEASE_EXPIRED = "relay stopped renewing its lease while handling it"
RESCUE_ABANDONED = text(
    """
    WITH clock AS (SELECT coalesce(CAST(:now AS timestamptz), statement_timestamp()) AS now),
    abandoned AS (
        SELECT id,
               claimed_by = ANY(CAST(:dead AS uuid[])) AS died,
               attempts >= :max_attempts AS spent
        FROM outbox
        WHERE claimed_by IS NOT NULL AND sent_at IS NULL AND dead_at IS NULL
          AND NOT id = ANY(CAST(:held AS bigint[]))
          AND CASE WHEN claimed_by = ANY(CAST(:dead AS uuid[]))
                   THEN available_at > (SELECT now FROM clock)
                        OR last_error IS DISTINCT FROM :relay_died
                        OR attempts >= :max_attempts
                   ELSE available_at <= (SELECT now FROM clock) END
        FOR UPDATE SKIP LOCKED
    )
    UPDATE outbox AS o
    SET available_at = least(o.available_at, (SELECT now FROM clock)),
        last_error = CASE WHEN a.died THEN :relay_died ELSE :lease_expired END,
        dead_at = CASE WHEN a.spent THEN (SELECT now FROM clock) END,
        claimed_by = CASE WHEN a.died AND NOT a.spent AND o.last_error = :relay_died
                          THEN o.claimed_by END
    FROM abandoned AS a
    WHERE o.id = a.id
    RETURNING o.id, o.dead_at IS NOT NULL
    """
)
# Whether this relay could claim an abandoned row now (it then runs them one at a time): the
# first match through ix_outbox_claimed answers, no count.
ABANDONED_DUE = text(
    """
    SELECT EXISTS (
        SELECT FROM outbox
        WHERE claimed_by IS NOT NULL AND sent_at IS NULL AND dead_at IS NULL
          AND available_at <= coalesce(CAST(:now AS timestamptz), statement_timestamp())
          AND topic = ANY(CAST(:topics AS text[]))
          AND attempts < :max_attempts
          AND NOT id = ANY(CAST(:held AS bigint[]))
    )
    """
)


async def owners_in_flight(conn: AsyncConnection) -> list[uuid.UUID]:
    return [row[0] for row in await conn.execute(OWNERS_IN_FLIGHT)]


async def rescue_abandoned(
    conn: AsyncConnection,
    *,
    dead: Sequence[uuid.UUID],
    held: Sequence[int],
    max_attempts: int,
    now: datetime | None,
) -> tuple[int, int]:
    """Make abandoned rows due (or dead); returns (rescued, buried)."""
    result = await conn.execute(
        RESCUE_ABANDONED,
        {
            "dead": list(dead),
            "held": list(held),
            "max_attempts": max_attempts,
            "now": now,
            "relay_died": RELAY_DIED,
            "lease_expired": LEASE_EXPIRED,
        },
    )
    rows = result.all()
    buried = sum(1 for row in rows if row[1])
    return len(rows) - buried, buried


async def abandoned_due(
    conn: AsyncConnection,
    *,
    topics: Sequence[str],
    held: Sequence[int],
    max_attempts: int,
    now: datetime | None,
) -> bool:
    params = {"topics": list(topics), "held": list(held), "max_attempts": max_attempts, "now": now}
    return bool((await conn.execute(ABANDONED_DUE, params)).scalar_one())


# --- The four states ----------------------------------------------------------------------
# Derived from the row, never stored (``outbox.schema``), by one rule that COUNT_BY_STATUS,
# COUNT_BY_TOPIC, the dashboard's lists (``outbox.dashboard.queries``) and
# ``outbox.admin.message_state`` all spell the same way:
#   sent      sent_at IS NOT NULL
#   dead      dead_at IS NOT NULL
#   retrying  neither, and last_error IS NOT NULL: it failed at least once and will be tried again
#   pending   neither, and last_error IS NULL: never failed (due, scheduled, or on its first try)
# ``attempts`` cannot tell: the attempt is counted when the claim starts it, so a message on its
# first try has attempts = 1 and has failed nothing yet. last_error is what every failure writes
# (MARK_RETRY_MANY; RESCUE_ABANDONED: RELAY_DIED or LEASE_EXPIRED), and nothing else does: a
# release on stop (RELEASE_MANY) gives the attempt back and leaves last_error as it was, so a
# first try handed back is pending again. A message whose relay died mid-try stays as it was
# (pending on a first try) until a live relay rescues it, about a second later; from then on it
# is retrying with "relay died while handling it". ``outbox retry`` keeps the dead message's
# last_error, so a requeued message is retrying (it failed, and will be tried again) with a fresh
# attempt budget.

# --- COUNT_BY_STATUS --------------------------------------------------------------------------
# For `outbox status` and the dashboard. Each part reads only its own rows: pending, retrying and
# the oldest due time walk ix_outbox_due (partial on "unsent and not dead", so sent rows cost
# nothing; last_error is read from those rows), the dead count ix_outbox_dead_at, the sent count
# ix_outbox_sent_at (an index-only scan once VACUUM has set the visibility map; the planner may
# scan a table of small rows instead). Measured (1,000,000 sent rows of ~450-byte mails, 2,000
# dead, 1,000 unsent, vacuumed; medians of 15 interleaved runs on 2 busy cores): 302 ms as one
# pass over the table, 83 ms this way; at 100,000 rows 31 ms and 6.8 ms. The unsent part takes
# under a millisecond; what remains is the sent count, which still reads every sent entry.
# oldest_pending_age_s is how long the oldest due, unsent message has been waiting since it became
# due (0 when none is due), the figure to alert on: it grows when relays are down or cannot keep
# up. A row in flight is not due (its available_at is its lease).
COUNT_BY_STATUS = text(
    """
    WITH clock AS (SELECT coalesce(CAST(:now AS timestamptz), statement_timestamp()) AS now),
    unsent AS (
        SELECT count(*) FILTER (WHERE last_error IS NULL) AS pending,
               count(*) FILTER (WHERE last_error IS NOT NULL) AS retrying,
               min(available_at) FILTER (WHERE available_at <= (SELECT now FROM clock)) AS oldest
        FROM outbox WHERE sent_at IS NULL AND dead_at IS NULL
    )
    SELECT unsent.pending, unsent.retrying,
           (SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL) AS dead,
           (SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL) AS sent,
           coalesce(extract(epoch FROM (SELECT now FROM clock) - unsent.oldest), 0)
               AS oldest_pending_age_s
    FROM unsent
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


# --- DELETE_DEAD ------------------------------------------------------------------------------
# `outbox discard` and the dashboard's Discard: delete dead rows, and only dead rows, so a
# message that was retried meanwhile (no longer dead) is never deleted by a stale click. The
# ids come through the primary key; --all-dead walks ix_outbox_dead_at. ``dead_until`` (the
# dashboard's "Discard all dead", confirmed on a page that showed the dead messages up to that
# moment) keeps the messages that died after the operator looked.
DELETE_DEAD = text(
    """
    DELETE FROM outbox
    WHERE dead_at IS NOT NULL AND (CAST(:all_dead AS boolean) OR id = ANY(CAST(:ids AS bigint[])))
      AND (CAST(:dead_until AS timestamptz) IS NULL
           OR dead_at <= CAST(:dead_until AS timestamptz))
    RETURNING id
    """
)


async def delete_dead(
    conn: AsyncConnection,
    *,
    ids: Sequence[int],
    all_dead: bool,
    dead_until: datetime | None = None,
) -> list[int]:
    params = {"ids": list(ids), "all_dead": all_dead, "dead_until": dead_until}
    result = await conn.execute(DELETE_DEAD, params)
    return sorted(row[0] for row in result)


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


# --- COUNT_BY_TOPIC ---------------------------------------------------------------------------
# Per topic: pending and retrying (from ix_outbox_due, by the rule above), dead
# (ix_outbox_dead_at) and sent in the last hour (a range of ix_outbox_sent_at). All-time sent
# counts per topic are left out on purpose: they would read every sent row the table keeps.
COUNT_BY_TOPIC = text(
    """
    WITH counts AS (
        SELECT topic, count(*) FILTER (WHERE last_error IS NULL) AS pending,
               count(*) FILTER (WHERE last_error IS NOT NULL) AS retrying,
               0 AS dead, 0 AS sent_last_hour
        FROM outbox WHERE sent_at IS NULL AND dead_at IS NULL GROUP BY topic
        UNION ALL
        SELECT topic, 0, 0, count(*), 0
        FROM outbox WHERE dead_at IS NOT NULL GROUP BY topic
        UNION ALL
        SELECT topic, 0, 0, 0, count(*)
        FROM outbox
        WHERE sent_at > coalesce(CAST(:now AS timestamptz), statement_timestamp())
                        - interval '1 hour'
        GROUP BY topic
    )
    SELECT topic, sum(pending) AS pending, sum(retrying) AS retrying, sum(dead) AS dead,
           sum(sent_last_hour) AS sent_last_hour
    FROM counts GROUP BY topic ORDER BY topic
    """
)


async def count_by_topic(
    conn: AsyncConnection, *, now: datetime | None = None
) -> list[dict[str, Any]]:
    rows = (await conn.execute(COUNT_BY_TOPIC, {"now": now})).mappings()
    return [
        {"topic": r["topic"], **{k: int(r[k]) for k in ("pending", "retrying", "dead")}}
        | {"sent_last_hour": int(r["sent_last_hour"])}
        for r in rows
    ]
