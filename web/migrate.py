"""Run the service's Alembic history from code (``outbox dev``, the tests).

The history is the repository's ``migrations/`` folder; the app's distribution ships it as
``web/migrations`` (a link to it in the checkout), so an installed app finds it without the
repository's ``alembic.ini``.
"""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

import outbox.migrate


def alembic_config(connection: Connection | None = None) -> Config:
    """The service's Alembic configuration; with ``connection``, migrations run on it."""
    config = Config()
    config.set_main_option("script_location", str(files("web") / "migrations"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection, revision: str = "head") -> None:
    command.upgrade(alembic_config(connection), revision)


def upgrade_url(database_url: str, revision: str = "head") -> None:
    """Upgrade the database at ``database_url`` (any accepted spelling) in its own transaction."""
    with outbox.migrate.transaction(database_url) as connection:
        upgrade(connection, revision)
