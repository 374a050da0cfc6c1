"""Enqueue a message inside the caller's transaction.

There is deliberately no variant that opens or commits its own transaction: the message must exist
if and only if the caller's own writes do, so the caller's commit is the only commit.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy.ext.asyncio import AsyncSession

from outbox import queries
from outbox.queries import Executor


async def enqueue(
    conn: Executor,
    *,
    topic: str,
    payload: Any,
    available_at: datetime | None = None,
    notify: bool = True,
) -> uuid.UUID:
    """Add a message to the outbox in ``conn``'s open transaction and return its Message-ID UUID.

    ``conn`` is a SQLAlchemy ``AsyncConnection`` or ``AsyncSession``. ``payload`` must be
    JSON-serialisable. With ``notify`` the relays are woken when (and only if) the transaction
    commits; without it they find the message on their next poll.
    """
    if not topic:
        raise ValueError("topic must be a non-empty string")
    pooled = await _pooled_driver(conn)
    if pooled is None:
        return await queries.insert_message(
            conn, topic=topic, payload=payload, available_at=available_at, notify=notify
        )
    previous = pooled.prepare_threshold
    pooled.prepare_threshold = None  # put back at once: see _pooled_driver
    try:
        return await queries.insert_message(
            conn, topic=topic, payload=payload, available_at=available_at, notify=notify
        )
    finally:
        pooled.prepare_threshold = previous


_POOLED = "outbox_pooled"  # key in SQLAlchemy's per-DBAPI-connection ``info`` dict


async def _pooled_driver(conn: Executor) -> psycopg.AsyncConnection[Any] | None:
    """The psycopg connection under ``conn`` if it goes through a pooler and may prepare.

    psycopg prepares a statement on the server once a connection has run it 5 times (its
    ``prepare_threshold``). Behind PgBouncer in transaction pooling mode the next transaction
    runs on another server connection, where that statement does not exist (or another client's
    of the same name does): measured, 132 of 1,000 concurrent enqueues failed that way on an
    engine with psycopg's defaults. The caller's engine is not ours to configure, so there the
    insert alone runs unprepared, and the connection's setting is put back at once (a connection
    serves one coroutine at a time, so nothing else runs on it meanwhile).

    Direct connections keep the prepared insert, as before (see bench/ab_periphery.py). A pooler
    is recognised once per connection, by one query: a pooler answers the client's startup with
    a process id of its own, so the ``backend_pid`` psycopg was told differs from the server's
    ``pg_backend_pid()``. (Session pooling is taken for a pooler too: it only loses the prepare.)
    """
    connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
    sync = connection.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        raw = sync.connection  # checked out already: an attribute, not a greenlet hop (~17 us)
    else:
        raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if not isinstance(driver, psycopg.AsyncConnection) or driver.prepare_threshold is None:
        return None
    pooled = raw.info.get(_POOLED)
    if pooled is None:
        pooled = raw.info[_POOLED] = (
            await queries.server_backend_pid(connection) != driver.info.backend_pid
        )
    return driver if pooled else None
