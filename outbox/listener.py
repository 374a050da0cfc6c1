"""Wake the relay on NOTIFY, from a dedicated autocommit connection that heals itself.

A notification is only a hint to look now: the relay polls anyway, so a dropped LISTEN connection
slows wake-ups down to the poll interval but loses nothing. When the connection drops the listener
says so (log + ``connected`` flag), keeps retrying with backoff, and wakes the relay once it is
back, since notifications sent meanwhile were missed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import psycopg

from outbox.backoff import next_delay
from outbox.schema import NOTIFY_CHANNEL

logger = logging.getLogger(__name__)

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
KEEPALIVE_ARGS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,  # milliseconds
    "connect_timeout": 10,  # seconds
}


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
        self._rng = random.Random()
        self.connected = False

    def _set_state(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            if self._on_state is not None:
                self._on_state(connected)

    async def run(self) -> None:
        """Listen until cancelled."""
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, application_name="outbox-listen", **KEEPALIVE_ARGS
                ) as conn:
                    await conn.execute(f"LISTEN {self._channel}")  # validated identifier
                    if failures:
                        logger.info("listen connection restored", extra={"action": "listen_up"})
                    failures = 0
                    self._set_state(True)
                    self._wake.set()  # anything sent while we were not listening
                    async for _ in conn.notifies():
                        self._wake.set()
            except (psycopg.Error, OSError) as exc:
                failures += 1
                self._set_state(False)
                delay = next_delay(failures, base=0.2, cap=self._max_backoff, rng=self._rng)
                logger.warning(
                    "listen connection lost (%s); polling until it is back, retry in %.1fs",
                    exc,
                    delay,
                    extra={"action": "listen_down"},
                )
                await asyncio.sleep(delay)
