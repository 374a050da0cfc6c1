"""outbox: a transactional outbox on PostgreSQL.

Enqueue a message in the same transaction as the writes it belongs to; a relay delivers it after
the commit, with retries, and never for a transaction that rolled back.
"""

from __future__ import annotations

from outbox import migrate, smtp
from outbox.enqueue import enqueue
from outbox.errors import (
    AmbiguousSendError,
    ConfigError,
    OutboxError,
    PermanentSendError,
    SendError,
    TransientSendError,
    UnknownTopicError,
)
from outbox.message import EmailPayload, OutboxMessage
from outbox.registry import HandlerRegistry, default_registry, handler
from outbox.relay import BatchResult, Relay, RelayConfig

__all__ = [
    "AmbiguousSendError",
    "BatchResult",
    "ConfigError",
    "EmailPayload",
    "HandlerRegistry",
    "OutboxError",
    "OutboxMessage",
    "PermanentSendError",
    "Relay",
    "RelayConfig",
    "SendError",
    "TransientSendError",
    "UnknownTopicError",
    "default_registry",
    "enqueue",
    "handler",
    "migrate",
    "smtp",
]
