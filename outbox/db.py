"""Engines for the relay, the web app and the CLI, configured the same way everywhere."""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy.exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox.listener import KEEPALIVE_ARGS
from outbox.settings import libpq_url, normalise_database_url


def create_engine(
    database_url: str,
    *,
    application_name: str,
    idle_in_transaction_timeout: float | None = None,
    pool_size: int = 5,
) -> AsyncEngine:
    """An async engine on psycopg 3 with TCP keepalives and, for relays, a bound on idle
    transactions, so a vanished or frozen client releases its row locks (see RelayConfig)."""
    options = []
    if idle_in_transaction_timeout is not None:
        ms = int(idle_in_transaction_timeout * 1000)
        options.append(f"-c idle_in_transaction_session_timeout={ms}")
    connect_args: dict[str, Any] = {"application_name": application_name, **KEEPALIVE_ARGS}
    if options:
        connect_args["options"] = " ".join(options)
    return create_async_engine(
        normalise_database_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def engine_libpq_url(engine: AsyncEngine) -> str:
    """The engine's URL for a plain psycopg connection (the LISTEN connection)."""
    return libpq_url(engine.url.render_as_string(hide_password=False))


def is_connection_error(exc: BaseException) -> bool:
    """Errors that reconnecting can heal: the server went away, restarted or refused us."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        sqlalchemy.exc.OperationalError
        | sqlalchemy.exc.InterfaceError
        | psycopg.OperationalError
        | psycopg.InterfaceError
        | ConnectionError,
    )


# SQLSTATE 42P01 (undefined_table) and 42703 (undefined_column): the statement names a table or
# a column the database does not have, i.e. its schema is older than the code (or absent).
SCHEMA_BEHIND = frozenset({"42P01", "42703"})


def missing_schema(exc: BaseException) -> str | None:
    """The server's "relation/column ... does not exist" message when ``exc`` (or what it wraps)
    says the schema is missing or behind, else ``None``: on a database nobody migrated every
    statement fails that way, and the operator needs "run outbox migrate", not a traceback."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, psycopg.Error) and current.sqlstate in SCHEMA_BEHIND:
            return current.diag.message_primary or str(current).splitlines()[0]
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None
