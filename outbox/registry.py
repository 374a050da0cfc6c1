"""Handlers by topic: the relay looks each claimed message's topic up here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from outbox.errors import UnknownTopicError
from outbox.message import OutboxMessage

# A handler delivers one message. It returns an optional short result to keep on the row (the
# SMTP server's reply, say), raises TransientSendError to retry later, PermanentSendError to give
# up at once; any other exception is retried like a transient one.
Handler = Callable[[OutboxMessage], Awaitable[str | None]]


class HandlerRegistry:
    """Map topics to async handlers; as light to use as Celery's ``@task``."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def handler(self, topic: str) -> Callable[[Handler], Handler]:
        """Decorator: ``@registry.handler("invoice.created")`` over ``async def f(message)``."""

        def decorate(func: Handler) -> Handler:
            self.register(topic, func)
            return func

        return decorate

    def register(self, topic: str, func: Handler) -> None:
        if not topic:
            raise ValueError("topic must be a non-empty string")
        self._handlers[topic] = func

    def get(self, topic: str) -> Handler:
        try:
            return self._handlers[topic]
        except KeyError:
            raise UnknownTopicError(f"no handler is registered for topic {topic!r}") from None

    def merged(self, other: HandlerRegistry) -> HandlerRegistry:
        """A new registry with this one's handlers and then ``other``'s (which win)."""
        combined = HandlerRegistry()
        combined._handlers = {**self._handlers, **other._handlers}
        return combined

    @property
    def topics(self) -> list[str]:
        return sorted(self._handlers)


# The registry `outbox relay` uses for handlers declared with ``@outbox.handler(...)``.
default_registry = HandlerRegistry()
handler = default_registry.handler
