"""Enqueue a message inside the caller's transaction, whatever the caller's connection is.

There is deliberately no variant that opens or commits its own transaction: the message must exist
if and only if the caller's own writes do, so the caller's commit is the only commit.

One function serves sync and async apps: a sync connection gets the UUID back at once, an async
one an awaitable of it (the overloads tell the type checker which). Anything else is a
``TypeError`` at the call, never a coroutine that silently goes unawaited.
"""

from __future__ import annotations

import uuid
from collections.abc import Coroutine
from datetime import datetime
from functools import lru_cache
from typing import Any, LiteralString, TypeAlias, overload

import psycopg
from psycopg.rows import tuple_row
from sqlalchemy import Connection, TextClause
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, scoped_session

from outbox.queries import Insert

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


def _sqlalchemy_sync(conn: Connection | Session | scoped_session[Any], insert: Insert) -> uuid.UUID:
    message_id = conn.execute(insert.statement, insert.params).scalar()
    if message_id is None and insert.existing is not None:
        message_id = conn.execute(*insert.existing).scalar_one()
    assert isinstance(message_id, uuid.UUID)
    return message_id


async def _sqlalchemy_async(
    conn: AsyncConnection | AsyncSession | async_scoped_session[Any], insert: Insert
) -> uuid.UUID:
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
    with conn.cursor(row_factory=tuple_row) as cursor:
        row = cursor.execute(_psycopg_sql(insert.statement), insert.params).fetchone()
        if row is None and insert.existing is not None:
            statement, params = insert.existing
            row = cursor.execute(_psycopg_sql(statement), params).fetchone()
    assert row is not None and isinstance(row[0], uuid.UUID)
    return row[0]


async def _psycopg_async(conn: psycopg.AsyncConnection[Any], insert: Insert) -> uuid.UUID:
    _check_in_transaction(conn)
    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(_psycopg_sql(insert.statement), insert.params)
        row = await cursor.fetchone()
        if row is None and insert.existing is not None:
            statement, params = insert.existing
            await cursor.execute(_psycopg_sql(statement), params)
            row = await cursor.fetchone()
    assert row is not None and isinstance(row[0], uuid.UUID)
    return row[0]
