"""Wake the relay on NOTIFY, from a dedicated autocommit connection that heals itself.

A notification is only a hint to look now: the relay polls anyway, so a dropped LISTEN connection
slows wake-ups down to the poll interval but loses nothing. When the connection drops the listener
says so (log + ``connected`` flag), reconnects at once and then keeps retrying with backoff
(tenacity, the shape of ``outbox.reconnect`` with a longer cap), and wakes the relay once it is
back, since notifications sent meanwhile were missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from outbox.db import connection_defaults
from outbox.reconnect import DATABASE_BASE_S
from outbox.schema import NOTIFY_CHANNEL

logger = logging.getLogger(__name__)


class Listener:
    def __init__(
        self,
        dsn: str,
        wake: asyncio.Event,
        *,
        channel: str = NOTIFY_CHANNEL,
        on_state: Callable[[bool], None] | None = None,
        max_backoff: float = 10.0,
    ) -> None:
        if not channel.isidentifier():
            raise ValueError(f"channel must be an identifier, not {channel!r}")
        self._dsn = dsn
        self._wake = wake
        self._channel = channel
        self._on_state = on_state
        self._max_backoff = max_backoff
        self.connected = False

    def _set_state(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            if self._on_state is not None:
                self._on_state(connected)

    async def run(self) -> None:
        """Listen until cancelled: connect (retried by tenacity while it fails), serve the
        notifications until the connection drops, start again with a fresh count."""
        restored = False
        while True:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type((psycopg.Error, OSError)),
                wait=_listen_wait(self._max_backoff),
                before_sleep=self._connect_failed,
                reraise=True,
            )
            conn: psycopg.AsyncConnection[Any] = await retrying(self._connect)
            if restored or retrying.statistics.get("attempt_number", 1) > 1:
                logger.info("listen connection restored", extra={"action": "listen_up"})
            restored = await self._serve(conn)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self._dsn,
            autocommit=True,
            application_name="outbox-listen",
            **connection_defaults(conninfo_to_dict(self._dsn)),
        )
        try:
            await conn.execute(f"LISTEN {self._channel}")  # validated identifier
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Wake the relay on every notification; True once the connection is lost.

        Closed, not left to ``async with`` (which commits on a clean exit, and the error that
        ended the stream is handled here): closing a lost connection cannot raise."""
        try:
            self._set_state(True)
            self._wake.set()  # anything sent while we were not listening
            try:
                async for _ in conn.notifies():
                    self._wake.set()
            except (psycopg.Error, OSError) as exc:
                self._set_state(False)
                logger.warning(
                    "listen connection lost (%s); polling until it is back, reconnecting",
                    exc,
                    extra={"action": "listen_down"},
                )
                return True
            return False  # the server ended the stream without an error: connect again
        finally:
            await conn.close()

    def _connect_failed(self, state: RetryCallState) -> None:
        """One line per failed connect, with the wait before the next."""
        self._set_state(False)
        exc = state.outcome.exception() if state.outcome is not None else None
        logger.warning(
            "listen connection lost (%s); polling until it is back, retry in %.1fs",
            exc,
            state.upcoming_sleep,
            extra={"action": "listen_down"},
        )


def _listen_wait(cap: float) -> wait_base:
    """The wait between failed connects: the relay's database wait (``outbox.reconnect``) with a
    longer cap, since polling covers the gap and nothing waits on this connection."""
    half = DATABASE_BASE_S / 2
    return wait_exponential(multiplier=half, max=cap / 2) + wait_random_exponential(
        multiplier=half, max=cap / 2
    )
