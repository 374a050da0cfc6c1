"""Run the Alembic migrations from code (``outbox migrate``, ``outbox dev``, the tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(connection: Connection | None = None) -> Config:
    """The repository's alembic.ini; with ``connection``, migrations run on it (no URL needed)."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection, revision: str = "head") -> None:
    command.upgrade(alembic_config(connection), revision)


def downgrade(connection: Connection, revision: str = "base") -> None:
    command.downgrade(alembic_config(connection), revision)


def upgrade_url(database_url: str, revision: str = "head") -> None:
    """Upgrade the database at ``database_url`` (any accepted spelling) in its own transaction."""
    from sqlalchemy import create_engine

    from outbox.settings import normalise_database_url, split_pgbouncer_marker

    # A migration is one transaction, so it may run through PgBouncer; the marker is ours only.
    engine = create_engine(split_pgbouncer_marker(normalise_database_url(database_url))[0])
    try:
        with engine.begin() as connection:
            upgrade(connection, revision)
    finally:
        engine.dispose()
