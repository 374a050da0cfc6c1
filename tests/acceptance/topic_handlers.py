"""A handler module for `outbox relay --import`: one topic, no mail."""

from __future__ import annotations

import outbox


@outbox.handler("welcome")
async def welcome(message: outbox.OutboxMessage) -> str:
    return f"welcomed {message.payload['user_id']}"
