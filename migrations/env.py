"""Alembic environment: async, URL from DATABASE_URL, or a connection handed in by the caller.

``config.attributes["connection"]`` lets tests and ``outbox migrate`` run migrations on a
connection they already hold (the Alembic cookbook's recipe), without a second URL to keep.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from outbox.errors import ConfigError
from outbox.schema import metadata as outbox_metadata
from outbox.settings import Settings, split_pgbouncer_marker
from web.ratelimit import rate_limits_table  # noqa: F401  (registers the table)
from web.users import metadata as users_metadata

config = context.config
target_metadata = [outbox_metadata, users_metadata]


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
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
    url = Settings.from_env().database_url
    if url is None:
        raise ConfigError("DATABASE_URL is required to run migrations")
    asyncio.run(_run_async(split_pgbouncer_marker(url)[0]))  # the marker is not libpq's


if context.is_offline_mode():
    raise ConfigError("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
