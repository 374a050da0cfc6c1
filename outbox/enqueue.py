"""Enqueue a message inside the caller's transaction.

There is deliberately no variant that opens or commits its own transaction: the message must exist
if and only if the caller's own writes do, so the caller's commit is the only commit.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from outbox import queries
from outbox.queries import Executor


async def enqueue(
    conn: Executor,
    *,
    topic: str,
    payload: Any,
    available_at: datetime | None = None,
    notify: bool = True,
) -> uuid.UUID:
    """Add a message to the outbox in ``conn``'s open transaction and return its Message-ID UUID.

    ``conn`` is a SQLAlchemy ``AsyncConnection`` or ``AsyncSession``. ``payload`` must be
    JSON-serialisable. With ``notify`` the relays are woken when (and only if) the transaction
    commits; without it they find the message on their next poll.
    """
    if not topic:
        raise ValueError("topic must be a non-empty string")
    return await queries.insert_message(
        conn, topic=topic, payload=payload, available_at=available_at, notify=notify
    )
