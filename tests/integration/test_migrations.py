"""Alembic is the only way the schema is made, and the declared schema matches it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
from alembic import command
from sqlalchemy import create_engine, inspect

from outbox.settings import libpq_url
from web import migrate

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = str(Path(sys.executable).with_name("alembic"))


def alembic(*args: str, db_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ALEMBIC, *args],
        cwd=ROOT,
        env={"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def tables(db_url: str) -> set[str]:
    with psycopg.connect(libpq_url(db_url)) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_migrations_upgrade_downgrade_upgrade_with_the_alembic_command(empty_db_url: str) -> None:
    up = alembic("upgrade", "head", db_url=empty_db_url)
    assert up.returncode == 0, up.stderr
    assert {"users", "outbox", "alembic_version"} <= tables(empty_db_url)

    down = alembic("downgrade", "base", db_url=empty_db_url)
    assert down.returncode == 0, down.stderr
    assert tables(empty_db_url) <= {"alembic_version"}

    again = alembic("upgrade", "head", db_url=empty_db_url)
    assert again.returncode == 0, again.stderr
    assert {"users", "outbox"} <= tables(empty_db_url)


def test_migrations_match_the_declared_schema(db_url: str) -> None:
    """`alembic check`: autogenerate finds nothing to add, so schema.py == migrations."""
    engine = create_engine(db_url)
    with engine.begin() as connection:
        command.check(migrate.alembic_config(connection))
    engine.dispose()


def test_migrations_outbox_columns_have_defaults_for_all_but_topic_and_payload(
    db_url: str,
) -> None:
    engine = create_engine(db_url)
    columns = {c["name"]: c for c in inspect(engine).get_columns("outbox")}
    engine.dispose()
    required_without_default = {
        name
        for name, c in columns.items()
        if not c["nullable"] and c["default"] is None and not c.get("identity")
    }
    assert required_without_default == {"topic", "payload"}
