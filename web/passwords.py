"""Password hashing with Argon2id, off the event loop.

``argon2.PasswordHasher()`` with the library's defaults: Argon2id, time_cost=3, memory_cost=64 MiB,
parallelism=4, 16-byte salt, 32-byte hash (RFC 9106's "low memory" recommendation). The encoded
hash records its parameters, so raising them later still verifies old hashes, and
``needs_rehash`` tells when to upgrade one.

One hash takes tens of milliseconds of CPU; run on the event loop it would stall every other
request, so both functions run in a worker thread.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from starlette.concurrency import run_in_threadpool

_hasher = PasswordHasher()


async def hash_password(password: str) -> str:
    """The encoded Argon2id hash (``$argon2id$v=19$m=65536,t=3,p=4$...``)."""
    return await run_in_threadpool(_hasher.hash, password)


__all__ = ["hash_password"]
