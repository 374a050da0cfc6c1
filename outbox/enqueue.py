"""Enqueue a message inside the caller's transaction, whatever the caller's connection is.

There is deliberately no variant that opens or commits its own transaction: the message must exist
if and only if the caller's own writes do, so the caller's commit is the only commit.

One function serves sync and async apps: a sync connection gets the UUID back at once, an async
one an awaitable of it (the overloads tell the type checker which). Anything else is a
``TypeError`` at the call, never a coroutine that silently goes unawaited.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from functools import lru_cache
from typing import Any, LiteralString, TypeAlias, overload

import psycopg
from psycopg.rows import tuple_row
from sqlalchemy import Connection, TextClause
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, scoped_session

from outbox.queries import SELECT_BACKEND_PID, Insert

SyncConnection: TypeAlias = Connection | Session | scoped_session[Any] | psycopg.Connection[Any]
AsyncConnectionLike: TypeAlias = (
    AsyncConnection | AsyncSession | async_scoped_session[Any] | psycopg.AsyncConnection[Any]
)

ACCEPTED = (
    "a SQLAlchemy Connection or Session (sync), a SQLAlchemy AsyncConnection or AsyncSession, "
    "or a psycopg 3 Connection or AsyncConnection"
)


@overload
def enqueue(
    conn: SyncConnection,
    *,
    topic: str,
    payload: Any,
    available_at: datetime | None = None,
    notify: bool = True,
    dedupe_key: str | None = None,
) -> uuid.UUID: ...


@overload
def enqueue(
    conn: AsyncConnectionLike,
    *,
    topic: str,
    payload: Any,
    available_at: datetime | None = None,
    notify: bool = True,
    dedupe_key: str | None = None,
) -> Coroutine[Any, Any, uuid.UUID]: ...


def enqueue(
    conn: SyncConnection | AsyncConnectionLike,
    *,
    topic: str,
    payload: Any,
    available_at: datetime | None = None,
    notify: bool = True,
    dedupe_key: str | None = None,
) -> uuid.UUID | Coroutine[Any, Any, uuid.UUID]:
    """Add a message to the outbox in ``conn``'s open transaction; return its UUID (its mail's
    Message-ID), or with an async ``conn`` an awaitable of it.

    ``payload`` must be JSON-serialisable. With ``notify`` the relays are woken when (and only
    if) the transaction commits; without it they find the message on their next poll.
    ``available_at`` delays delivery until then. With ``dedupe_key``, while a message with that
    key is in the table (any state, until purged) no second one is written and the existing
    message's UUID is returned.
    """
    if not isinstance(topic, str) or not topic:
        raise ValueError("topic must be a non-empty string")
    if dedupe_key is not None and (not isinstance(dedupe_key, str) or not dedupe_key):
        raise ValueError("dedupe_key must be a non-empty string or None")
    insert = Insert.of(
        topic=topic,
        payload=payload,
        available_at=available_at,
        notify=notify,
        dedupe_key=dedupe_key,
    )
    if isinstance(conn, AsyncConnection | AsyncSession | async_scoped_session):
        return _sqlalchemy_async(conn, insert)
    if isinstance(conn, Connection | Session | scoped_session):
        return _sqlalchemy_sync(conn, insert)
    if isinstance(conn, psycopg.AsyncConnection):
        return _psycopg_async(conn, insert)
    if isinstance(conn, psycopg.Connection):
        return _psycopg_sync(conn, insert)
    raise TypeError(f"enqueue() takes {ACCEPTED}; got {type(conn).__qualname__}")


# --- behind a transaction pooler ---------------------------------------------------------------
# psycopg prepares a statement on the server once a connection has run it 5 times (its
# ``prepare_threshold``). Behind PgBouncer in transaction pooling mode the next transaction runs on
# another server connection, where that statement does not exist (or another client's of the same
# name does): measured, 132 of 1,000 concurrent enqueues failed that way on an engine with
# psycopg's defaults. The caller's connection is not ours to configure, so there the insert alone
# runs unprepared and the connection's setting is put back at once (a connection serves one caller
# at a time). Direct connections keep the prepared insert (bench/ab_periphery.py: ~1 us a call).
#
# A pooler is recognised once per connection by one query: it answers the client's startup with a
# process id of its own, so the ``backend_pid`` psycopg was told differs from the server's
# ``pg_backend_pid()``. Session pooling is taken for a pooler too: it only loses the prepare.
_POOLED: weakref.WeakKeyDictionary[psycopg.BaseConnection[Any], bool] = weakref.WeakKeyDictionary()


def _may_prepare_behind_pooler(driver: Any) -> bool:
    """Whether ``driver`` may prepare and its pooler status is still unknown or "pooled"."""
    return isinstance(driver, psycopg.BaseConnection) and driver.prepare_threshold is not None


@contextmanager
def _unprepared(driver: psycopg.BaseConnection[Any]) -> Iterator[None]:
    previous = driver.prepare_threshold
    driver.prepare_threshold = None
    try:
        yield
    finally:
        driver.prepare_threshold = previous


def _pooled_sync(driver: psycopg.Connection[Any]) -> bool:
    known = _POOLED.get(driver)
    if known is None:
        with driver.cursor(row_factory=tuple_row) as cursor:
            row = cursor.execute(_psycopg_sql(SELECT_BACKEND_PID)).fetchone()
        known = _POOLED[driver] = row is not None and row[0] != driver.info.backend_pid
    return known


async def _pooled_async(driver: psycopg.AsyncConnection[Any]) -> bool:
    known = _POOLED.get(driver)
    if known is None:
        async with driver.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(_psycopg_sql(SELECT_BACKEND_PID))
            row = await cursor.fetchone()
        known = _POOLED[driver] = row is not None and row[0] != driver.info.backend_pid
    return known


def _sqlalchemy_driver(conn: Connection | Session | scoped_session[Any]) -> Any:
    connection = conn if isinstance(conn, Connection) else conn.connection()
    return connection.connection.driver_connection


async def _sqlalchemy_async_driver(
    conn: AsyncConnection | AsyncSession | async_scoped_session[Any],
) -> Any:
    connection = conn if isinstance(conn, AsyncConnection) else await conn.connection()
    sync = connection.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        return sync.connection.driver_connection  # checked out: an attribute, no greenlet hop
    return (await connection.get_raw_connection()).driver_connection


def _sqlalchemy_sync(conn: Connection | Session | scoped_session[Any], insert: Insert) -> uuid.UUID:
    driver = _sqlalchemy_driver(conn)
    pooled = _may_prepare_behind_pooler(driver) and _pooled_sync(driver)
    with _unprepared(driver) if pooled else nullcontext():
        message_id = conn.execute(insert.statement, insert.params).scalar()
        if message_id is None and insert.existing is not None:
            message_id = conn.execute(*insert.existing).scalar_one()
    assert isinstance(message_id, uuid.UUID)
    return message_id


async def _sqlalchemy_async(
    conn: AsyncConnection | AsyncSession | async_scoped_session[Any], insert: Insert
) -> uuid.UUID:
    driver = await _sqlalchemy_async_driver(conn)
    pooled = _may_prepare_behind_pooler(driver) and await _pooled_async(driver)
    with _unprepared(driver) if pooled else nullcontext():
        message_id = (await conn.execute(insert.statement, insert.params)).scalar()
        if message_id is None and insert.existing is not None:
            message_id = (await conn.execute(*insert.existing)).scalar_one()
    assert isinstance(message_id, uuid.UUID)
    return message_id


_PSYCOPG_DIALECT = psycopg_dialect()  # type: ignore[no-untyped-call]


@lru_cache(maxsize=16)
def _psycopg_sql(statement: TextClause) -> LiteralString:
    """``statement`` in psycopg's own placeholder style (``%(name)s``), compiled once.

    The text is one of ``outbox.queries``' constants, never built from input, which is what
    psycopg's ``LiteralString`` annotation asks for.
    """
    compiled: LiteralString = statement.compile(dialect=_PSYCOPG_DIALECT).string
    return compiled


def _check_in_transaction(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    # In autocommit mode outside `with conn.transaction()` the row would commit on its own, apart
    # from the caller's writes: exactly what an outbox exists to prevent.
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    if conn.autocommit and idle:
        raise ValueError(
            "enqueue() needs the caller's open transaction: this psycopg connection is in "
            "autocommit mode outside `with conn.transaction():`"
        )


# The caller's connection may have any row factory (dict_row, a class): our cursor has its own.
def _psycopg_sync(conn: psycopg.Connection[Any], insert: Insert) -> uuid.UUID:
    _check_in_transaction(conn)
    pooled = _may_prepare_behind_pooler(conn) and _pooled_sync(conn)
    with (
        _unprepared(conn) if pooled else nullcontext(),
        conn.cursor(row_factory=tuple_row) as cursor,
    ):
        row = cursor.execute(_psycopg_sql(insert.statement), insert.params).fetchone()
        if row is None and insert.existing is not None:
            statement, params = insert.existing
            row = cursor.execute(_psycopg_sql(statement), params).fetchone()
    assert row is not None and isinstance(row[0], uuid.UUID)
    return row[0]


async def _psycopg_async(conn: psycopg.AsyncConnection[Any], insert: Insert) -> uuid.UUID:
    _check_in_transaction(conn)
    pooled = _may_prepare_behind_pooler(conn) and await _pooled_async(conn)
    with _unprepared(conn) if pooled else nullcontext():
        return await _psycopg_async_insert(conn, insert)


async def _psycopg_async_insert(conn: psycopg.AsyncConnection[Any], insert: Insert) -> uuid.UUID:
    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(_psycopg_sql(insert.statement), insert.params)
        row = await cursor.fetchone()
        if row is None and insert.existing is not None:
            statement, params = insert.existing
            await cursor.execute(_psycopg_sql(statement), params)
            row = await cursor.fetchone()
    assert row is not None and isinstance(row[0], uuid.UUID)
    return row[0]
