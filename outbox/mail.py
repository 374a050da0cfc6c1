"""The built-in ``email`` topic: build the mail from its payload and hand it to an SMTP server.

The relay never imports aiosmtplib; this module translates every SMTP and socket failure into
``TransientSendError`` / ``AmbiguousSendError`` / ``PermanentSendError`` at the edge.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, parseaddr
from typing import Any

import aiosmtplib

from outbox.errors import (
    AmbiguousSendError,
    PermanentSendError,
    TransientSendError,
)
from outbox.message import OutboxMessage
from outbox.settings import SmtpConfig

logger = logging.getLogger(__name__)

EMAIL_TOPIC = "email"
# Headers a payload may not set: the relay owns them (Message-ID must be the row's UUID) or they
# are built from the payload's own fields.
_RESERVED_HEADERS = frozenset(
    {"message-id", "from", "to", "cc", "bcc", "subject", "date", "content-type", "mime-version"}
    | {"content-transfer-encoding"}
)


def message_id_header(message_id: uuid.UUID, mail_from: str) -> str:
    """``<uuid@domain-of-MAIL_FROM>``: the same on every retry of one outbox row."""
    domain = parseaddr(mail_from)[1].rpartition("@")[2] or "localhost"
    return f"<{message_id}@{domain}>"


def _recipients(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(a, str) for a in items):
        raise PermanentSendError("payload 'to' must be an address or a non-empty list of them")
    return items


def build_email(payload: Any, *, message_id: uuid.UUID, mail_from: str) -> EmailMessage:
    """The MIME message for an ``email`` payload; a malformed payload is a permanent failure.

    The ``SMTP`` policy refuses header values containing CR or LF, so user data cannot add or
    change headers; non-ASCII subjects and names are RFC 2047-encoded by the policy.
    """
    if not isinstance(payload, dict):
        raise PermanentSendError("an email payload must be a JSON object")
    for field in ("subject", "text"):
        if not isinstance(payload.get(field), str):
            raise PermanentSendError(f"payload {field!r} must be a string")
    to = _recipients(payload.get("to"))
    sender = payload.get("from") or mail_from
    try:
        msg = EmailMessage(policy=SMTP)
        msg["From"] = sender
        msg["To"] = ", ".join(to)
        msg["Subject"] = payload["subject"]
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = message_id_header(message_id, mail_from)
        for name, value in (payload.get("headers") or {}).items():
            if str(name).lower() in _RESERVED_HEADERS:
                raise PermanentSendError(f"payload header {name!r} is set by the relay")
            msg[str(name)] = str(value)
        msg.set_content(payload["text"])
        if isinstance(payload.get("html"), str):
            msg.add_alternative(payload["html"], subtype="html")
    except (ValueError, TypeError) as exc:
        raise PermanentSendError(f"the mail cannot be built: {exc}") from exc
    return msg


def envelope_address(header_value: str) -> str:
    """The bare address of a header value such as ``"Ann <ann@example.com>"``."""
    address = parseaddr(header_value)[1]
    if not address:
        raise PermanentSendError(f"not an email address: {header_value!r}")
    Address(addr_spec=address)  # raises on a malformed address
    return address


class _TrackingSMTP(aiosmtplib.SMTP):
    """Remembers whether the message body has started to go out, and the final reply.

    A failure after that point is ambiguous: the server may have queued the mail. It is retried
    all the same (at-least-once), with the same Message-ID so the receiver can drop the copy.
    """

    body_started = False
    last_reply = ""

    async def data(self, message: str | bytes, /, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        self.body_started = True
        response = await super().data(message, **kwargs)
        self.last_reply = f"{response.code} {response.message}"
        return response


class SmtpSender:
    """Deliver ``email`` messages over a small pool of reused SMTP connections.

    Opening a connection (TCP, EHLO, maybe TLS and AUTH) costs more than sending a short mail, so
    connections are kept and reused; one that failed is dropped and reopened on next use.
    """

    def __init__(
        self,
        smtp: SmtpConfig,
        *,
        mail_from: str,
        timeout: float = 30.0,
        pool_size: int = 8,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._smtp = smtp
        self._mail_from = mail_from
        self._timeout = timeout
        self._slots: asyncio.Queue[_TrackingSMTP | None] = asyncio.Queue()
        for _ in range(pool_size):
            self._slots.put_nowait(None)

    def _new_client(self) -> _TrackingSMTP:
        return _TrackingSMTP(
            hostname=self._smtp.host,
            port=self._smtp.port,
            username=self._smtp.username,
            password=self._smtp.password,
            use_tls=self._smtp.use_tls,
            start_tls=self._smtp.start_tls,
            timeout=self._timeout,
        )

    async def __call__(self, message: OutboxMessage) -> str:
        """The ``email`` handler: returns the server's final reply, e.g. ``250 2.0.0 Ok``."""
        mail = build_email(
            message.payload, message_id=message.message_id, mail_from=self._mail_from
        )
        sender = envelope_address(str(mail["From"]))
        recipients = [envelope_address(a) for a in _recipients(message.payload["to"])]
        client = await self._slots.get()
        keep = False
        try:
            if client is None or not client.is_connected:
                client = self._new_client()
                async with asyncio.timeout(self._timeout):
                    await client.connect()
            client.body_started = False
            async with asyncio.timeout(self._timeout):
                refused, _ = await client.send_message(mail, sender=sender, recipients=recipients)
            keep = True
            reply = client.last_reply
            if refused:
                reply += "; refused: " + ", ".join(
                    f"{rcpt} {resp.code} {resp.message}" for rcpt, resp in refused.items()
                )
            return reply
        except aiosmtplib.SMTPRecipientsRefused as exc:
            keep = True
            codes = [r.code for r in exc.recipients]
            error = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if all(code >= 500 for code in codes):
                raise PermanentSendError(f"all recipients refused: {error}") from exc
            raise TransientSendError(f"recipients refused: {error}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            keep = not isinstance(exc, aiosmtplib.SMTPServerDisconnected)
            text = f"SMTP {exc.code} {exc.message}"
            if exc.code >= 500 and not isinstance(
                exc, aiosmtplib.SMTPAuthenticationError | aiosmtplib.SMTPConnectError
            ):
                raise PermanentSendError(text) from exc
            raise TransientSendError(text) from exc
        except aiosmtplib.SMTPNotSupported as exc:
            keep = True
            raise PermanentSendError(f"SMTP server cannot take this mail: {exc}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # Timeouts, refused or dropped connections: worth another try later.
            reason = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
            if client is not None and client.body_started:
                raise AmbiguousSendError(
                    f"connection {reason} after the message body was sent; the server may "
                    "have accepted it (retrying with the same Message-ID)"
                ) from exc
            raise TransientSendError(f"SMTP connection {reason}") from exc
        except ValueError as exc:  # an address aiosmtplib refuses to put on the wire
            keep = True
            raise PermanentSendError(f"invalid address: {exc}") from exc
        finally:
            if not keep and client is not None:
                client.close()
                client = None
            self._slots.put_nowait(client)

    async def aclose(self) -> None:
        """Say QUIT on every idle connection; called when the relay stops."""
        while not self._slots.empty():
            client = self._slots.get_nowait()
            if client is not None and client.is_connected:
                try:
                    async with asyncio.timeout(2):
                        await client.quit()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
