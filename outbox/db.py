"""Engines for the relay, the web app and the CLI, configured the same way everywhere.

Direct to PostgreSQL or through PgBouncer in transaction pooling mode (``?pgbouncer=true`` on the
URL, or ``pgbouncer=True``). Transaction pooling hands each *transaction* whichever server
connection is free, so nothing may outlive a transaction on the server side:

- session settings cannot go in the startup packet (PgBouncer refuses ``options``: "unsupported
  startup parameter"), nor in a plain ``SET`` (it would stick to a server connection that other
  clients then get); they are set with ``set_config(..., is_local => true)`` at the start of every
  transaction instead, which lasts exactly that transaction;
- psycopg's automatic server-side prepared statements (after 5 runs of one statement on a
  connection) would be prepared on one server connection and looked up on another ("prepared
  statement "_pg3_0" does not exist" / "already exists"): they are turned off
  (``prepare_threshold=None``);
- LISTEN cannot work at all (the listening server connection is handed to someone else): the
  relay takes a direct URL for it (``OUTBOX_LISTEN_URL``) or polls (see ``outbox.runner``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox.settings import libpq_url, normalise_database_url, split_pgbouncer_marker

# How every outbox connection notices a network that drops its packets (a host that died, a
# cable cut, a partition), with libpq's own settings:
# - keepalives: an idle connection whose peer vanished is dropped within about idle + interval *
#   count = 25 s instead of the kernel default of hours;
# - tcp_user_timeout: so is one with a request in flight. Keepalives are not sent while data
#   waits to be acknowledged; TCP then retransmits with a doubling delay for about 15 minutes
#   (tcp_retries2), and a query sent during a partition is only answered at the first
#   retransmission after the network comes back: measured, a relay cut off for 60 s claimed
#   nothing for 49 s more (tests/fault/test_partition.py). Dropped at 25 s, the relay reconnects
#   instead, and a fresh connection gets through as soon as the network is back;
# - connect_timeout: a connection attempt into the void gives up after 10 s and is tried again,
#   instead of waiting out the kernel's SYN retries (psycopg's default: 130 s).
CONNECTION_DEFAULTS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,  # milliseconds
    "connect_timeout": 10,  # seconds
}


def connection_defaults(given: Iterable[str]) -> dict[str, Any]:
    """``CONNECTION_DEFAULTS`` less the settings a database URL already names: the user's choice
    wins (keyword arguments to psycopg's connect override the URL's own parameters)."""
    return {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}


def create_engine(
    database_url: str,
    *,
    application_name: str,
    idle_in_transaction_timeout: float | None = None,
    pool_size: int = 5,
    pgbouncer: bool | None = None,
) -> AsyncEngine:
    """An async engine on psycopg 3 with TCP keepalives and, for relays, a bound on idle
    transactions, so a vanished or frozen client releases its row locks (see RelayConfig).

    ``pgbouncer``: the URL leads to PgBouncer in transaction pooling mode; ``None`` (the default)
    reads the URL's ``pgbouncer=true|false`` marker.
    """
    url, marked = split_pgbouncer_marker(normalise_database_url(database_url))
    pooled = marked if pgbouncer is None else pgbouncer
    session_settings: dict[str, str] = {}
    if idle_in_transaction_timeout is not None:
        ms = int(idle_in_transaction_timeout * 1000)
        session_settings["idle_in_transaction_session_timeout"] = str(ms)
    connect_args: dict[str, Any] = {
        "application_name": application_name,
        **connection_defaults(make_url(url).query),
    }
    if pooled:
        connect_args["prepare_threshold"] = None
    elif session_settings:
        connect_args["options"] = " ".join(f"-c {k}={v}" for k, v in session_settings.items())
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )
    if pooled and session_settings:
        _set_local_on_begin(engine, session_settings)
    return engine


# Every session setting of an engine, for the current transaction only (is_local => true), in one
# round trip whatever their number; names and values are bound parameters.
SET_LOCAL_MANY = text(
    """
    SELECT set_config(name, value, true)
    FROM unnest(CAST(:names AS text[]), CAST(:values AS text[])) AS s(name, value)
    """
)


def _set_local_on_begin(engine: AsyncEngine, settings: dict[str, str]) -> None:
    """Apply ``settings`` at the start of every transaction of ``engine``, for it alone.

    Costs one round trip per transaction, paid only behind PgBouncer (direct connections get the
    settings once, at connect), and not in autocommit, where there is no transaction to set.
    """
    params = {"names": list(settings), "values": list(settings.values())}

    @event.listens_for(engine.sync_engine, "begin")
    def _set_local(conn: Connection) -> None:
        # In autocommit (the relay's statements) each statement is its own transaction: a local
        # setting would end with this one, and cost a round trip for nothing.
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            conn.execute(SET_LOCAL_MANY, params)


def engine_libpq_url(engine: AsyncEngine) -> str:
    """The engine's URL for a plain psycopg connection (the LISTEN connection)."""
    return libpq_url(engine.url.render_as_string(hide_password=False))
