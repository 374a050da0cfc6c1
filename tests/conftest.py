"""Real-server fixtures: a PostgreSQL (given or embedded), a migrated template, a throwaway
database per test, and a capture SMTP server on 127.0.0.1.

``OUTBOX_TEST_DATABASE_URL`` names an admin URL on an existing server (CI sets it to the machine's
PostgreSQL); when it is unset an embedded server is started with pgserver, the same one
``outbox dev`` uses, with its data under ``.outbox/test-pgdata``.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox.db import create_engine as create_async_engine
from outbox.settings import libpq_url, normalise_database_url
from web import migrate
from web.capture import CaptureServer

ROOT = Path(__file__).resolve().parent.parent

# The capture SMTP server runs in a thread of the test process; a short GIL switch interval keeps
# each SMTP round trip from waiting out the default 5 ms slice.
sys.setswitchinterval(0.0005)


def _database_url(admin_url: str, name: str) -> str:
    url = make_url(normalise_database_url(admin_url)).set(database=name)
    return url.render_as_string(hide_password=False)


def _admin_execute(admin_url: str, sql: str) -> None:
    with psycopg.connect(libpq_url(admin_url), autocommit=True) as conn:
        conn.execute(sql)  # names below are generated, never input


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    given = os.environ.get("OUTBOX_TEST_DATABASE_URL")
    if given:
        yield given
        return
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - pgserver is a dependency
        pytest.fail(f"set OUTBOX_TEST_DATABASE_URL or install pgserver: {exc}")
    data = ROOT / ".outbox" / "test-pgdata"
    data.parent.mkdir(exist_ok=True)
    server = pgserver.get_server(str(data), cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """A database migrated by Alembic itself, copied for every test (fast: a file copy)."""
    name = f"outbox_tpl_{uuid.uuid4().hex[:10]}"
    _admin_execute(pg_admin_url, f'CREATE DATABASE "{name}"')
    engine = create_engine(_database_url(pg_admin_url, name))
    with engine.begin() as connection:
        migrate.upgrade(connection)
    engine.dispose()
    yield name
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db_url(pg_admin_url: str) -> Iterator[str]:
    """A brand-new database with no schema at all (for migration tests)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    _admin_execute(pg_admin_url, f'CREATE DATABASE "{name}"')
    yield _database_url(pg_admin_url, name)
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A throwaway, fully migrated database of this test's own."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    _admin_execute(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield _database_url(pg_admin_url, name)
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(db_url, application_name="outbox-test")
    yield eng
    await eng.dispose()


@pytest.fixture
def smtp_server() -> Iterator[CaptureServer]:
    with CaptureServer(limit=0) as server:
        yield server
