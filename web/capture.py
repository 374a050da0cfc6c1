"""A capture SMTP server (aiosmtpd): keeps every mail it accepts in memory.

``outbox dev`` uses it when ``SMTP_URL`` is unset (the mails show at /dev/mail) and the tests use
it as the real SMTP server on 127.0.0.1. ``reply`` makes it answer DATA with a chosen code (451,
550, ...) to exercise the retry and dead paths; ``delay`` makes it slow, and
``stall`` makes it hang forever on mail to chosen recipients. ``refuse`` answers RCPT for chosen
recipients with a chosen reply, and ``max_recipients`` answers ``452 4.5.3`` to the RCPTs of a
transaction past that number, as servers with a recipient limit do. ``in_data`` counts the
DATA commands being answered right now (stalled ones included) and ``most_in_data`` the most at
once: how tests see how many sends a relay runs at the same time.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from functools import cached_property
from typing import Any

from aiosmtpd.controller import Controller

# aiosmtpd logs every connection at INFO; a capture server has nothing to say at that level.
logging.getLogger("mail.log").setLevel(logging.WARNING)


@dataclass(frozen=True)
class CapturedMail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @cached_property  # parsed once: /dev/mail reads several headers and parts of one mail
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


class _Handler:
    def __init__(self, server: CaptureServer) -> None:
        self._server = server

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._server.refuse.get(address)
        if reply is not None:
            return reply
        limit = self._server.max_recipients
        if limit and len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        capture = self._server
        capture.in_data += 1  # only this server's own event loop thread writes these
        capture.most_in_data = max(capture.most_in_data, capture.in_data)
        try:
            if capture.stall and capture.stall & set(envelope.rcpt_tos):
                await asyncio.Event().wait()  # swallow the body and never answer
            if capture.delay:
                await asyncio.sleep(capture.delay)
            return capture._accept(envelope)
        finally:
            capture.in_data -= 1


class CaptureServer:
    """Start with ``start()`` (or as a context manager); mails are in ``.mails``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, limit: int = 1000) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.limit = limit
        self.reply: str | None = None
        self.delay = 0.0  # seconds to think before answering DATA: a slow mail server
        self.stall: set[str] = set()  # recipients whose mail is read but never answered
        self.refuse: dict[str, str] = {}  # recipient -> its RCPT reply ("550 5.1.1 No such user")
        self.max_recipients = 0  # RCPTs accepted per transaction (0: no limit)
        self.data_attempts = 0
        self.in_data = 0  # DATA commands being answered now
        self.most_in_data = 0  # the most at once
        self._mails: list[CapturedMail] = []
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def _accept(self, envelope: Any) -> str:
        with self._lock:
            self.data_attempts += 1
            if self.reply is not None:
                return self.reply
            content = envelope.original_content or envelope.content
            raw = content if isinstance(content, bytes) else str(content).encode()
            self._mails.append(CapturedMail(envelope.mail_from, tuple(envelope.rcpt_tos), raw))
            if self.limit and len(self._mails) > self.limit:
                del self._mails[: -self.limit]
            return f"250 2.0.0 Ok: queued as {self.data_attempts:X}"

    @property
    def mails(self) -> list[CapturedMail]:
        with self._lock:
            return list(self._mails)

    def clear(self) -> None:
        with self._lock:
            self._mails.clear()

    def start(self) -> CaptureServer:
        """Listen on ``port``; after ``stop()`` this starts again on the same port, as a mail
        server coming back from an outage would (its mails so far are kept)."""
        # A Controller owns an event loop it closes on stop, so every start needs a new one.
        self._controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            server_kwargs={"data_size_limit": 10 * 1024 * 1024, "enable_SMTPUTF8": True},
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> CaptureServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
