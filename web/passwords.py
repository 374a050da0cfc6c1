"""Password hashing with Argon2id, off the event loop, with a bound of its own.

``argon2.PasswordHasher()`` with the library's defaults: Argon2id, time_cost=3, memory_cost=64 MiB,
parallelism=4, 16-byte salt, 32-byte hash (RFC 9106's "low memory" recommendation). The encoded
hash records its parameters, so raising them later still verifies old hashes, and
``needs_rehash`` tells when to upgrade one.

One hash takes tens of milliseconds of CPU and 64 MiB; run on the event loop it would stall every
other request, so it runs in a worker thread. Not on anyio's shared 40-thread pool without a
bound, though (issue 11, finding 5: 200 parallel signups took the process to 2.3 GiB, with an
endless queue behind them): a ``HashGate`` lets ``concurrency`` hashes run at once (by default
2 per core: 2 cores are saturated by about 6 signups a second anyway) and ``queue`` more wait;
anything beyond is refused at once with ``HashingBusyError``, which the app answers 503 with
``Retry-After``. Memory for hashing is then at most ``concurrency x 64 MiB``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from argon2 import PasswordHasher

_hasher = PasswordHasher()


class HashingBusyError(Exception):
    """Every hashing slot is busy and the queue is full: try again in a moment."""


class HashGate:
    """At most ``concurrency`` hashes at once, at most ``queue`` waiting, the rest refused."""

    def __init__(self, *, concurrency: int | None = None, queue: int | None = None) -> None:
        self.concurrency = concurrency or 2 * (os.cpu_count() or 1)
        self.queue = self.concurrency * 4 if queue is None else queue
        self._limiter: anyio.CapacityLimiter | None = None
        self._admitted = 0

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one of the ``concurrency + queue`` places, or raise ``HashingBusyError`` now.

        Taken before the request's other work (the rate-limit count), so a request refused
        for lack of room has not spent its client's allowance.
        """
        if self._admitted >= self.concurrency + self.queue:
            raise HashingBusyError()
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    def _bound(self) -> anyio.CapacityLimiter:
        # Made on first use, inside the running event loop (anyio ties it to that loop's backend).
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        return self._limiter

    async def run(self, fn: Callable[[str], str], arg: str) -> str:
        """``fn(arg)`` in a worker thread, within the gate's bounds."""
        limiter = self._bound()
        if limiter.available_tokens == 0 and limiter.statistics().tasks_waiting >= self.queue:
            raise HashingBusyError()
        return await anyio.to_thread.run_sync(fn, arg, limiter=limiter)


_DEFAULT_GATE = HashGate()


async def hash_password(password: str, *, gate: HashGate | None = None) -> str:
    """The encoded Argon2id hash (``$argon2id$v=19$m=65536,t=3,p=4$...``).

    Raises ``HashingBusyError`` when ``gate`` (default: one per process) is full.
    """
    return await (gate or _DEFAULT_GATE).run(_hasher.hash, password)


__all__ = ["HashGate", "HashingBusyError", "hash_password"]
