"""The value types that travel between the queue and the handlers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NotRequired, TypedDict

# The whole mail, rendered at enqueue time so the relay only has to hand it over. Functional
# syntax because "from" is a keyword; it overrides MAIL_FROM for this one message.
EmailPayload = TypedDict(
    "EmailPayload",
    {
        "to": str | list[str],
        "subject": str,
        "text": str,
        "html": NotRequired[str],
        "headers": NotRequired[dict[str, str]],
        "from": NotRequired[str],
    },
)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A claimed row, as a handler sees it. ``attempts`` counts failures before this one."""

    id: int
    message_id: uuid.UUID
    topic: str
    payload: Any
    attempts: int
    created_at: datetime
