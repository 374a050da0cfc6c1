"""Assemble a relay process from settings: engine, handlers, listener, metrics, purge, signals.

Kept apart from ``relay.py`` so the relay itself knows nothing of SMTP or of the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from datetime import timedelta

from prometheus_client import start_http_server

from outbox import admin
from outbox.db import create_engine, engine_libpq_url
from outbox.mail import EMAIL_TOPIC, SmtpSender
from outbox.registry import HandlerRegistry, default_registry
from outbox.relay import BatchResult, Relay, RelayConfig
from outbox.settings import Settings
from outbox.settlelog import SettleLog, StreamSettleLog
from outbox.signals import on_stop

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
    """A relay with the built-in ``email`` handler plus every ``@outbox.handler`` (which win)."""
    settings.require("database_url", "smtp_url")
    assert settings.database_url is not None
    engine = create_engine(
        settings.database_url,
        application_name="outbox-relay",
        idle_in_transaction_timeout=config.idle_in_transaction_timeout,
        pool_size=4,  # producer, completer, heartbeat and rescuer each hold one at times
    )
    # The sender's own deadline sits just inside the relay's, so a slow SMTP server is reported
    # by the sender (which knows whether the body went out) rather than cut off blind.
    sender = SmtpSender(
        settings.smtp,
        mail_from=settings.mail_from,
        timeout=config.send_timeout * 0.9,
        pool_size=config.concurrency,
    )
    builtin = HandlerRegistry()
    builtin.register(EMAIL_TOPIC, sender)
    handlers = builtin.merged(default_registry).merged(registry or HandlerRegistry())
    relay = Relay(
        engine, handlers, config, listen_dsn=engine_libpq_url(engine), settle_log=settle_log
    )
    try:
        yield relay
    finally:
        await sender.aclose()
        await engine.dispose()


async def _purge_forever(relay: Relay, retention: timedelta) -> None:
    while True:
        try:
            await admin.purge(relay.engine, older_than=retention)
        except Exception as exc:
            logger.warning("purge failed: %s", exc, extra={"action": "purge_sent"})
        await asyncio.sleep(PURGE_EVERY_S)


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
        if metrics_port is not None:
            start_http_server(metrics_port, addr=metrics_host, registry=relay.metrics.registry)
        with on_stop(relay.stop):
            if once:
                result = await relay.drain()
                logger.info(
                    "drained: %d sent, %d to retry, %d dead",
                    result.sent,
                    result.retried,
                    result.dead,
                    extra={"action": "drain", **vars(result)},
                )
                return result
            background = [asyncio.create_task(relay.sample_queue())]
            if retention is not None:
                background.append(asyncio.create_task(_purge_forever(relay, retention)))
            logger.info(
                "relay running (batch %d, concurrency %d); stops within %.0fs of SIGTERM",
                config.batch_size,
                config.concurrency,
                config.stop_bound,
                extra={"action": "start_relay"},
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
