"""The exception tree of the outbox library.

Every error's docstring is its default message, so ``raise ConfigError()`` still says something.
"""

from __future__ import annotations


class OutboxError(Exception):
    """An outbox error occurred."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(OutboxError):
    """The configuration is invalid."""


class SendError(OutboxError):
    """A message could not be delivered."""


class TransientSendError(SendError):
    """Delivery failed for a reason that may heal by itself; retry later."""


class AmbiguousSendError(TransientSendError):
    """The server may have accepted the message before the failure; it will be retried with the
    same Message-ID so the receiver can drop the duplicate."""


class PermanentSendError(SendError):
    """Delivery failed for a reason that retrying will not fix."""


class UnknownTopicError(PermanentSendError):
    """No handler is registered for this topic."""


class NotMigratedError(OutboxError):
    """The database is not migrated: run `outbox migrate`."""


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its class name when it has none): what a command
    prints for a user's mistake instead of a traceback."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
