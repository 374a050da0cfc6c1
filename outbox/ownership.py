"""A relay's owner id, proved alive by a session advisory lock that PostgreSQL drops with it.

Every claim a relay makes carries its owner id (``outbox.claimed_by``). The relay holds a
session-level advisory lock keyed by that id on a connection of its own, for as long as it runs.
When the process exits, is killed (``kill -9``, the OOM killer, a segfault, ``os._exit`` in a
handler) or loses that connection, PostgreSQL releases the lock at once; any other relay that
probes the lock (``OWNER_LOCK_PROBE``) then knows the owner is gone and rescues its rows, about a
second after the crash instead of after a lease. A relay that is frozen (SIGSTOP) or cut off keeps
its session until TCP gives up, so its rows come back when their lease runs out instead.

An owner id is used for one lock session only: a relay whose lock connection drops takes a new id
before it claims again, so "this owner's lock is free" never becomes false again once seen.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from outbox import queries
from outbox.db import connection_defaults


def lock_key(owner: uuid.UUID) -> int:
    """The advisory lock key of ``owner``: its first 64 bits, as PostgreSQL's signed bigint."""
    return int.from_bytes(owner.bytes[:8], "big", signed=True)


class OwnerSession:
    """One owner id and the autocommit connection that holds its lock. ``close()`` ends both."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], owner: uuid.UUID) -> None:
        self._conn = conn
        self.owner = owner

    @classmethod
    async def open(cls, dsn: str, *, application_name: str = "outbox-relay-lock") -> OwnerSession:
        conn = await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=True,
            application_name=application_name,
            **connection_defaults(conninfo_to_dict(dsn)),
        )
        try:
            owner = uuid.uuid4()
            cur = await conn.execute(queries.OWNER_LOCK, {"key": lock_key(owner)})
            row = await cur.fetchone()
            if not row or not row[0]:  # a 64-bit collision with a live lock: astronomically rare
                raise RuntimeError("could not take the relay's owner lock")
        except BaseException:
            await conn.close()
            raise
        return cls(conn, owner)

    async def dead(self, owners: Iterable[uuid.UUID]) -> list[uuid.UUID]:
        """The ``owners`` whose lock nobody holds: their relay's session is gone.

        Also proves this session alive: a dropped connection raises here, and the caller
        opens a new session (with a new owner id) before claiming again.
        """
        by_key = {lock_key(owner): owner for owner in owners}
        cur = await self._conn.execute(queries.OWNER_LOCK_PROBE, {"keys": list(by_key)})
        return [by_key[row[0]] for row in await cur.fetchall()]

    async def close(self) -> None:
        await self._conn.close()


class LeaseOnlyOwner:
    """An owner id without a lock, for a relay whose only way to the database is a transaction
    pooler: it never reports another owner dead, so abandoned rows come back by their lease."""

    def __init__(self) -> None:
        self.owner = uuid.uuid4()

    async def dead(self, owners: Iterable[uuid.UUID]) -> list[uuid.UUID]:
        return []

    async def close(self) -> None:
        return None
