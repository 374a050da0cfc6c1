"""Alembic environment of the service (the signup app's tables plus the library's outbox table).

The app's own revisions live in ``versions/``; the library's table is installed by calling
``outbox.migrate.upgrade`` from a revision (0001 and 0003), exactly as any host app would. The
library keeps its own version table (``outbox_schema_version``), which autogenerate is told to
ignore.

``config.attributes["connection"]`` lets tests and ``outbox dev`` run migrations on a connection
they already hold (the Alembic cookbook's recipe), without a second URL to keep.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from outbox.errors import one_line
from outbox.migrate import VERSION_TABLE
from outbox.schema import metadata as outbox_metadata
from outbox.settings import Settings, split_pgbouncer_marker
from web.tables import metadata as app_metadata

config = context.config
target_metadata = [outbox_metadata, app_metadata]


def _include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    return not (type_ == "table" and name == VERSION_TABLE)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        include_name=_include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # Run from the command line: a user mistake is one line, not a traceback.
    try:
        url = Settings.from_env().database_url
    except Exception as exc:
        raise SystemExit(f"alembic: {one_line(exc)}") from None
    if url is None:
        raise SystemExit("alembic: DATABASE_URL is required (set in the environment)")
    try:
        asyncio.run(_run_async(split_pgbouncer_marker(url)[0]))  # the marker is not libpq's
    except OSError as exc:
        raise SystemExit(f"alembic: cannot reach the database: {one_line(exc)}") from None
    except Exception as exc:
        from outbox.dberrors import is_connection_error

        if is_connection_error(exc):
            raise SystemExit(f"alembic: cannot reach the database: {one_line(exc)}") from None
        raise


if context.is_offline_mode():
    raise SystemExit(
        "alembic: offline (--sql) migrations are not supported; run against a database"
    )
run_migrations_online()
