"""``outbox relay --import bench.noop``: a handler that does nothing, to measure the queue alone."""

from __future__ import annotations

import outbox

TOPIC = "noop"


@outbox.handler(TOPIC)
async def noop(message: outbox.OutboxMessage) -> None:
    return None
