"""Assemble a relay process from settings: engine, handlers, listener, metrics, purge, signals.

Kept apart from ``relay.py`` so the relay itself knows nothing of SMTP or of the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator
from datetime import timedelta

from prometheus_client import start_http_server
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outbox import admin, migrate, queries
from outbox.db import create_engine, engine_libpq_url
from outbox.dberrors import is_connection_error
from outbox.errors import ConfigError, NotMigratedError
from outbox.registry import HandlerRegistry, default_registry
from outbox.relay import BatchResult, Relay, RelayConfig
from outbox.settings import Settings, libpq_url
from outbox.settlelog import SettleLog, StreamSettleLog
from outbox.signals import on_stop
from outbox.smtp import EMAIL_TOPIC, email_handler

logger = logging.getLogger(__name__)

PURGE_EVERY_S = 300.0


@contextlib.asynccontextmanager
async def open_relay(
    settings: Settings,
    config: RelayConfig,
    *,
    registry: HandlerRegistry | None = None,
    settle_log: SettleLog | None = None,
) -> AsyncIterator[Relay]:
    """A relay with every ``@outbox.handler``, then ``registry``'s, and the built-in ``email``
    handler when ``SMTP_URL`` is set (a relay without it does not serve ``email``)."""
    settings.require("database_url")
    assert settings.database_url is not None
    engine = create_engine(
        settings.database_url,
        application_name="outbox-relay",
        idle_in_transaction_timeout=config.idle_in_transaction_timeout,
        pool_size=4,  # producer, completer, heartbeat and rescuer each hold one at times
    )
    builtin = HandlerRegistry()
    smtp = settings.smtp
    sender = None
    if smtp is not None:
        sender = email_handler(
            smtp,
            mail_from=settings.mail_from,
            send_timeout=config.send_timeout,
            pool_size=config.concurrency + config.slow_cap,  # every send that may run at once
        )
        builtin.register(EMAIL_TOPIC, sender)
    handlers = builtin.merged(default_registry).merged(registry or HandlerRegistry())
    relay = Relay(
        engine,
        handlers,
        config,
        listen_dsn=listen_dsn(settings, engine),
        pooled=settings.behind_pgbouncer,
        settle_log=settle_log,
    )
    try:
        yield relay
    finally:
        if sender is not None:
            await sender.aclose()
        await engine.dispose()


def listen_dsn(settings: Settings, engine: AsyncEngine) -> str | None:
    """Where the relay LISTENs: ``OUTBOX_LISTEN_URL`` if given, else the database itself, except
    through PgBouncer's transaction pooling, where LISTEN cannot work: then ``None`` (poll only).

    A LISTEN through transaction pooling would be worse than none: PgBouncer hands the server
    connection that ran LISTEN to other clients, so no notification ever reaches the relay while
    the connection (to PgBouncer) looks healthy.
    """
    if settings.listen_url is not None:
        return libpq_url(settings.listen_url)
    if settings.behind_pgbouncer:
        logger.info(
            "DATABASE_URL goes through PgBouncer and OUTBOX_LISTEN_URL is not set: no LISTEN, "
            "new messages are found by polling every --poll-interval",
            extra={"action": "listen_off"},
        )
        return None
    return engine_libpq_url(engine)


async def _purge_forever(relay: Relay, retention: timedelta) -> None:
    while True:
        try:
            await admin.purge(relay.engine, older_than=retention)
        except Exception as exc:
            logger.warning("purge failed: %s", exc, extra={"action": "purge_sent"})
        await asyncio.sleep(PURGE_EVERY_S)


async def _check_migrated(relay: Relay) -> None:
    """Refuse to start on a database without the outbox table, or with an older schema than this
    code's (a deploy that skipped ``outbox migrate``): one line, run outbox migrate.

    A database that does not answer is not refused: the relay waits for it with backoff, as it
    does for any outage, so relays may start before their database. A role that may not read
    the version table (least privilege) skips that half of the check.
    """
    try:
        async with relay.engine.connect() as conn:
            missing = await queries.missing_tables(conn, ["outbox"])
            applied = set() if missing else await _applied_versions(conn)
    except Exception as exc:
        if is_connection_error(exc):
            return
        raise
    if missing:
        raise NotMigratedError(
            "database not migrated ("
            + ", ".join(f'relation "{name}" does not exist' for name in missing)
            + "): run `outbox migrate`"
        )
    if applied and max(applied) < migrate.HEAD:
        raise NotMigratedError(
            f"database schema is behind this outbox (version {max(applied)}, this code needs "
            f"{migrate.HEAD}): run `outbox migrate`"
        )


async def _applied_versions(conn: AsyncConnection) -> set[int]:
    try:
        async with conn.begin_nested():  # a refusal must not abort the enclosing transaction
            return await conn.run_sync(migrate.applied_versions)
    except DBAPIError as exc:
        if is_connection_error(exc):
            raise
        return set()


def _serve_metrics(port: int, host: str, relay: Relay) -> None:
    try:
        start_http_server(port, addr=host, registry=relay.metrics.registry)
    except OSError as exc:  # most often: another relay on this machine has the port
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"--metrics-port {port}: cannot listen on {host}:{port}: {reason}"
        ) from None


async def serve_relay(
    settings: Settings,
    config: RelayConfig,
    *,
    once: bool = False,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    retention: timedelta | None = None,
    log_format: str = "text",
) -> BatchResult | None:
    """Run a relay until SIGTERM/SIGINT (or, with ``once``, until nothing is due).

    Settled-message lines go straight to stderr in ``log_format``, a batch at a time (see
    ``outbox.settlelog``); everything else goes through ``logging``.
    """
    settle_log = StreamSettleLog(sys.stderr, log_format)
    async with open_relay(settings, config, settle_log=settle_log) as relay:
        await _check_migrated(relay)
        # What the process keeps for its life is loaded by now (modules, engine, handlers): kept
        # out of the cyclic collector's sight, a full collection no longer walks its ~70,000
        # objects (measured: a 20-70 ms pause, which every message in flight would wait out).
        gc.freeze()
        if metrics_port is not None:
            _serve_metrics(metrics_port, metrics_host, relay)
        with on_stop(relay.stop):
            if once:
                result = await relay.drain()
                logger.info(
                    "drained: %d sent, %d to retry, %d dead",
                    result.sent,
                    result.retrying,
                    result.dead,
                    extra={"action": "drain", **vars(result)},
                )
                return result
            background = [asyncio.create_task(relay.sample_queue())]
            if retention is not None:
                background.append(asyncio.create_task(_purge_forever(relay, retention)))
            topics = relay.registry.topics
            logger.info(
                "relay running (batch %d, concurrency %d plus %d sends slower than %gs; "
                "topics: %s); stops within %.0fs of SIGTERM",
                config.batch_size,
                config.concurrency,
                config.slow_cap,
                config.slow_threshold,
                ", ".join(topics) or "none",
                config.stop_bound,
                extra={"action": "start_relay", "topics": topics},
            )
            try:
                await relay.run()
            finally:
                for task in background:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            logger.info("relay stopped", extra={"action": "stop_relay"})
            return None
