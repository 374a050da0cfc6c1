"""The relay and ``enqueue`` through a real PgBouncer in transaction pooling mode.

Before: the relay could not connect (``unsupported startup parameter: options``), 11.75 % of
concurrent enqueues failed on psycopg's automatic prepared statements, and LISTEN through the
pooler was dead while the metric said connected.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import outbox
from outbox.db import create_engine
from outbox.settings import libpq_url, normalise_database_url
from tests.fault.helpers import Delivered, RelayFactory, scalar, scaled, wait_until
from tests.fault.pgbouncer import PgBouncer, binary
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

_PREPARED = re.compile(r"prepared statement|_pg3_", re.IGNORECASE)


@pytest.fixture
def pgbouncer(db_url: str) -> Iterator[PgBouncer]:
    if binary() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's pgbouncer installed (.ci/run installs it)")
        pytest.skip("no pgbouncer on this machine (apt-get install pgbouncer); CI runs this test")
    bouncer = PgBouncer(db_url)
    try:
        yield bouncer.start()
    finally:
        bouncer.stop()


def _payload(n: int) -> dict[str, str]:
    return {"to": f"user{n}@example.test", "subject": f"S{n}", "text": f"T{n}"}


async def _enqueue_all(engines: list[AsyncEngine], numbers: range) -> list[str]:
    """Enqueue one message per number, all at once, round-robin over ``engines``; the errors."""
    errors: list[str] = []

    async def one(n: int) -> None:
        try:
            async with engines[n % len(engines)].begin() as conn:
                await outbox.enqueue(conn, topic="email", payload=_payload(n))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one(n) for n in numbers))
    return errors


_ADVISORY_LOCKS = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


async def test_relays_and_enqueue_through_pgbouncer_deliver_everything(
    db_url: str, pgbouncer: PgBouncer, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    """1,000 messages enqueued concurrently through PgBouncer, both from an engine with
    psycopg's defaults (as a user's app has) and from ``outbox.db.create_engine`` on a
    ``?pgbouncer=true`` URL, while 2 ``outbox relay`` processes deliver through it: every
    message delivered once, no prepared-statement error anywhere, LISTEN off (poll only)."""
    n = scaled(1000)
    pooled = pgbouncer.url(db_url)
    running = [relays.start(pooled, smtp_server.url, "--poll-interval", "0.2") for _ in range(2)]
    for relay in running:
        relay.wait_started()
    # No owner lock through the pooler: it would outlive the relay on a pooled server session,
    # and another relay's probe could take it again there (messages come back by their lease).
    assert scalar(db_url, _ADVISORY_LOCKS) == 0
    # A user's engine: psycopg's defaults (prepare_threshold=5), no marker on its URL.
    plain = create_async_engine(
        normalise_database_url(pgbouncer.url(db_url, marker=False)), pool_size=8
    )
    ours = create_engine(pooled, application_name="outbox-test", pool_size=8)
    try:
        errors = await _enqueue_all([plain, ours], range(1, n + 1))
    finally:
        await plain.dispose()
        await ours.dispose()
    assert errors == []

    wait_until(
        lambda: scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL") == n,
        120,
        f"{n} messages sent",
        alive=running,
    )
    delivered = Delivered(smtp_server).refresh()
    assert delivered.total == delivered.distinct == n
    clients = pgbouncer.admin("SHOW CLIENTS")
    assert "outbox-relay" in clients, "the relays talk to PgBouncer"
    for relay in running:
        log = relay.log()
        assert relay.alive(), relay.log_tail()
        assert "no LISTEN" in log
        assert not _PREPARED.search(log), relay.log_tail()
        assert "database unreachable" not in log, relay.log_tail()


async def test_relay_behind_pgbouncer_listens_on_the_direct_url(
    db_url: str, pgbouncer: PgBouncer, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    """With ``OUTBOX_LISTEN_URL`` a relay behind PgBouncer is woken by NOTIFY: with a 60 s poll
    interval, a message enqueued through PgBouncer is delivered at once."""
    relay = relays.start(
        pgbouncer.url(db_url),
        smtp_server.url,
        "--poll-interval",
        "60",
        OUTBOX_LISTEN_URL=db_url,
    )
    relay.wait_started()
    wait_until(
        lambda: scalar(
            db_url,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = 'outbox-listen' AND datname = current_database()",
        ),
        30,
        "the relay's LISTEN session on the direct URL",
        alive=[relay],
    )
    wait_until(lambda: scalar(db_url, _ADVISORY_LOCKS) == 1, 10, "the owner lock, held directly")
    time.sleep(0.5)  # the first drain after start is done; what follows is NOTIFY's doing
    engine = create_engine(pgbouncer.url(db_url), application_name="outbox-test")
    try:
        async with engine.begin() as conn:
            await outbox.enqueue(conn, topic="email", payload=_payload(1))
    finally:
        await engine.dispose()
    wait_until(lambda: smtp_server.mails, 20, "the mail, well before the 60 s poll", alive=[relay])


async def test_session_settings_hold_through_pgbouncer(db_url: str, pgbouncer: PgBouncer) -> None:
    """The relay's ``idle_in_transaction_session_timeout`` reaches the server through PgBouncer
    (set per transaction, not in the refused startup ``options``), and stays in the transaction:
    the server connection, shared with other clients, keeps its own value afterwards."""
    engine = create_engine(
        pgbouncer.url(db_url), application_name="outbox-relay", idle_in_transaction_timeout=7
    )
    try:
        for _ in range(8):  # more than psycopg's prepare threshold
            async with engine.begin() as conn:
                shown = (
                    await conn.execute(text("SHOW idle_in_transaction_session_timeout"))
                ).scalar()
                assert shown == "7s"
    finally:
        await engine.dispose()
    server_default = scalar(db_url, "SHOW idle_in_transaction_session_timeout")
    with psycopg.connect(libpq_url(pgbouncer.url(db_url)), autocommit=True) as conn:
        row = conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()
        assert row is not None and row[0] == server_default


async def test_idle_transaction_bound_is_enforced_through_pgbouncer(
    db_url: str, pgbouncer: PgBouncer
) -> None:
    """The bound does its job through PgBouncer: a relay transaction left idle past it is ended
    by the server (so a frozen relay's locks are released), and the engine carries on."""
    engine = create_engine(
        pgbouncer.url(db_url), application_name="outbox-relay", idle_in_transaction_timeout=1
    )
    try:
        with pytest.raises(DBAPIError):
            async with engine.begin() as conn:
                await conn.execute(text("SELECT 1"))
                await asyncio.sleep(4)  # idle in transaction, well past the 1 s bound
                await conn.execute(text("SELECT 1"))
        async with engine.begin() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()


async def _prepared_inserts(engine: AsyncEngine, *, session: bool) -> list[str]:
    """Enqueue 10 times on one connection (twice psycopg's prepare threshold), through an
    ``AsyncSession`` or an ``AsyncConnection``; return the statements the server has prepared."""
    query = text("SELECT statement FROM pg_prepared_statements")
    if session:
        async with AsyncSession(engine) as db:
            for n in range(10):
                await outbox.enqueue(db, topic="email", payload=_payload(n))
                await db.commit()
            return list((await db.execute(query)).scalars())
    async with engine.connect() as conn:
        for n in range(10):
            await outbox.enqueue(conn, topic="email", payload=_payload(n))
            await conn.commit()
        return list((await conn.execute(query)).scalars())


@pytest.mark.parametrize("session", [False, True], ids=["connection", "session"])
async def test_enqueue_is_prepared_direct_and_unprepared_through_pgbouncer(
    db_url: str, pgbouncer: PgBouncer, session: bool
) -> None:
    """On a direct connection the insert stays a prepared statement (cheaper); on the same
    default engine settings through PgBouncer it never becomes one, so it cannot fail."""
    direct = create_async_engine(normalise_database_url(db_url), pool_size=1)
    pooled = create_async_engine(
        normalise_database_url(pgbouncer.url(db_url, marker=False)), pool_size=1
    )
    try:
        assert any(
            "INSERT INTO outbox" in s for s in await _prepared_inserts(direct, session=session)
        )
        assert not any(
            "INSERT INTO outbox" in s for s in await _prepared_inserts(pooled, session=session)
        )
    finally:
        await direct.dispose()
        await pooled.dispose()
    assert scalar(db_url, "SELECT count(*) FROM outbox") == 20
