"""`outbox.enqueue` in every connection shape an app may hold: the message exists if and only if
the caller's transaction commits, and the relay delivers it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import outbox
from outbox.settings import libpq_url
from tests.integration.test_relay import email_registry
from web.capture import CaptureServer

PAYLOAD = {"to": "ann@example.test", "subject": "Hi", "text": "Hello"}


@pytest.fixture
def sync_engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


async def messages(engine: AsyncEngine) -> list[uuid.UUID]:
    async with engine.connect() as conn:
        return list((await conn.execute(text("SELECT message_id FROM outbox"))).scalars())


def enqueue_sync(engine: Engine, db_url: str, shape: str, *, commit: bool) -> uuid.UUID:
    """Enqueue once through a sync connection of ``shape``, then commit or roll back."""
    if shape == "sqlalchemy-connection":
        with engine.connect() as conn:
            message_id = outbox.enqueue(conn, topic="email", payload=PAYLOAD)
            conn.commit() if commit else conn.rollback()
    elif shape in ("sqlalchemy-session", "sqlalchemy-scoped-session"):
        factory = sessionmaker(engine)
        session: Session | scoped_session[Session] = (
            factory() if shape == "sqlalchemy-session" else scoped_session(factory)
        )
        message_id = outbox.enqueue(session, topic="email", payload=PAYLOAD)
        session.commit() if commit else session.rollback()
        session.close()
    else:
        with psycopg.connect(libpq_url(db_url), row_factory=dict_row) as pg:
            message_id = outbox.enqueue(pg, topic="email", payload=PAYLOAD)
            pg.commit() if commit else pg.rollback()
    return message_id


SYNC_SHAPES = [
    "sqlalchemy-connection",
    "sqlalchemy-session",
    "sqlalchemy-scoped-session",
    "psycopg",
]


@pytest.mark.parametrize("shape", SYNC_SHAPES)
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
async def test_enqueue_sync_shapes_return_the_uuid_and_follow_the_transaction(
    shape: str,
    commit: bool,
    sync_engine: Engine,
    db_url: str,
    engine: AsyncEngine,
    smtp_server: CaptureServer,
) -> None:
    message_id = enqueue_sync(sync_engine, db_url, shape, commit=commit)
    assert isinstance(message_id, uuid.UUID)
    assert await messages(engine) == ([message_id] if commit else [])
    result = await outbox.Relay(engine, email_registry(smtp_server)).drain()
    assert result.sent == (1 if commit else 0)
    assert len(smtp_server.mails) == (1 if commit else 0)


async def enqueue_async(engine: AsyncEngine, db_url: str, shape: str, *, commit: bool) -> Any:
    if shape == "sqlalchemy-async-connection":
        async with engine.connect() as conn:
            message_id = await outbox.enqueue(conn, topic="email", payload=PAYLOAD)
            await (conn.commit() if commit else conn.rollback())
    elif shape in ("sqlalchemy-async-session", "sqlalchemy-async-scoped-session"):
        if shape == "sqlalchemy-async-session":
            session: AsyncSession | async_scoped_session[AsyncSession] = AsyncSession(engine)
        else:
            session = async_scoped_session(
                async_sessionmaker(engine), scopefunc=lambda: "one scope"
            )
        message_id = await outbox.enqueue(session, topic="email", payload=PAYLOAD)
        await (session.commit() if commit else session.rollback())
        await session.close()
    else:
        async with await psycopg.AsyncConnection.connect(libpq_url(db_url)) as pg:
            message_id = await outbox.enqueue(pg, topic="email", payload=PAYLOAD)
            await (pg.commit() if commit else pg.rollback())
    return message_id


ASYNC_SHAPES = [
    "sqlalchemy-async-connection",
    "sqlalchemy-async-session",
    "sqlalchemy-async-scoped-session",
    "psycopg-async",
]


@pytest.mark.parametrize("shape", ASYNC_SHAPES)
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
async def test_enqueue_async_shapes_return_an_awaitable_and_follow_the_transaction(
    shape: str, commit: bool, engine: AsyncEngine, db_url: str, smtp_server: CaptureServer
) -> None:
    message_id = await enqueue_async(engine, db_url, shape, commit=commit)
    assert isinstance(message_id, uuid.UUID)
    assert await messages(engine) == ([message_id] if commit else [])
    result = await outbox.Relay(engine, email_registry(smtp_server)).drain()
    assert result.sent == (1 if commit else 0)


@pytest.mark.parametrize("bad", [None, "postgresql://x/y", object()])
def test_enqueue_anything_else_is_a_type_error_naming_the_shapes(bad: object) -> None:
    with pytest.raises(TypeError, match="SQLAlchemy Connection or Session.*psycopg 3"):
        outbox.enqueue(bad, topic="email", payload=PAYLOAD)  # type: ignore[call-overload]


def test_enqueue_refuses_a_psycopg_connection_in_autocommit_outside_a_transaction(
    db_url: str,
) -> None:
    with psycopg.connect(libpq_url(db_url), autocommit=True) as pg:
        with pytest.raises(ValueError, match="autocommit"):
            outbox.enqueue(pg, topic="email", payload=PAYLOAD)
        with pg.transaction():  # an explicit transaction block is fine
            outbox.enqueue(pg, topic="email", payload=PAYLOAD)
        assert pg.execute("SELECT count(*) FROM outbox").fetchone() == (1,)


def test_enqueue_never_commits(sync_engine: Engine) -> None:
    with sync_engine.connect() as conn:
        outbox.enqueue(conn, topic="email", payload=PAYLOAD)
        with sync_engine.connect() as other:
            assert other.execute(text("SELECT count(*) FROM outbox")).scalar_one() == 0
        conn.rollback()


def test_enqueue_dedupe_key_returns_the_existing_message(sync_engine: Engine) -> None:
    with sync_engine.begin() as conn:
        first = outbox.enqueue(conn, topic="email", payload=PAYLOAD, dedupe_key="welcome:42")
        again = outbox.enqueue(conn, topic="email", payload={"other": 1}, dedupe_key="welcome:42")
        other = outbox.enqueue(conn, topic="email", payload=PAYLOAD, dedupe_key="welcome:43")
        plain = outbox.enqueue(conn, topic="email", payload=PAYLOAD)
    assert again == first and other != first and plain not in (first, other)
    with sync_engine.begin() as conn:  # a later transaction, after the first committed
        assert (
            outbox.enqueue(conn, topic="email", payload=PAYLOAD, dedupe_key="welcome:42") == first
        )
        count = conn.execute(text("SELECT count(*) FROM outbox")).scalar_one()
    assert count == 3


def test_enqueue_dedupe_key_across_concurrent_transactions(sync_engine: Engine) -> None:
    """The second transaction waits on the first's uncommitted row, then returns its UUID."""
    import threading

    first = sync_engine.connect()
    first.begin()
    winner = outbox.enqueue(first, topic="email", payload=PAYLOAD, dedupe_key="k")
    seen: list[uuid.UUID] = []

    def second() -> None:
        with sync_engine.begin() as conn:
            seen.append(outbox.enqueue(conn, topic="email", payload=PAYLOAD, dedupe_key="k"))

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive(), "the second insert should wait for the first transaction"
    first.commit()
    first.close()
    thread.join(10)
    assert seen == [winner]


def test_enqueue_dedupe_key_after_a_rollback_writes_a_new_message(sync_engine: Engine) -> None:
    with sync_engine.connect() as conn:
        gone = outbox.enqueue(conn, topic="email", payload=PAYLOAD, dedupe_key="k")
        conn.rollback()
    with sync_engine.begin() as conn:
        kept = outbox.enqueue(conn, topic="email", payload=PAYLOAD, dedupe_key="k")
    assert kept != gone
