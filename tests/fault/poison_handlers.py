"""Handlers the fault tests load into a relay process with ``outbox relay --import``."""

from __future__ import annotations

import outbox
from outbox.message import OutboxMessage


@outbox.handler("poison")
async def poison(message: OutboxMessage) -> str | None:
    """Fails every time, the way a handler bug meets one bad payload."""
    raise ValueError("poison pill")
