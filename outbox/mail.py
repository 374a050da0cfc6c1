"""The built-in ``email`` topic: build the mail from its payload and hand it to an SMTP server.

The relay never imports aiosmtplib; this module translates every SMTP and socket failure into
``TransientSendError`` / ``AmbiguousSendError`` / ``PermanentSendError`` at the edge.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import uuid
from dataclasses import dataclass, field as _field
from email.header import Header
from email.message import EmailMessage
from email.policy import SMTPUTF8
from email.utils import formataddr, formatdate, getaddresses, parseaddr
from typing import Any

import aiosmtplib
import idna

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
# A bare ASCII dot-atom address ("ann.lee+tag@example.com"): nothing to parse or encode.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,75}")
# CR and LF would start a new header; other C0 controls and DEL have no business in one either.
_FORBIDDEN_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def message_id_header(message_id: uuid.UUID, mail_from: str) -> str:
    """``<uuid@domain-of-MAIL_FROM>``: the same on every retry of one outbox row."""
    return f"<{message_id}@{_message_id_domain(mail_from)}>"


@functools.lru_cache(maxsize=64)
def _message_id_domain(mail_from: str) -> str:
    return parseaddr(mail_from)[1].rpartition("@")[2] or "localhost"


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    """The envelope and the bytes that go after DATA."""

    sender: str
    recipients: list[str]
    data: bytes
    smtputf8: bool = False


def _recipients(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(a, str) for a in items):
        raise PermanentSendError("payload 'to' must be an address or a non-empty list of them")
    return items


def _check_header(name: str, value: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise PermanentSendError(f"invalid header name {name!r}")
    if _FORBIDDEN_IN_HEADER.search(value):
        raise PermanentSendError(f"header {name} contains a line break or control character")


def _address(header_value: str) -> tuple[str, str]:
    """(display name, bare address) of ``"Ann <ann@example.com>"``; refuses what is not one.

    An internationalised domain with an ASCII local part is sent in its ASCII (punycode) form,
    which every server takes; only a non-ASCII local part needs the server's SMTPUTF8.
    """
    if _PLAIN_ADDRESS.fullmatch(header_value):  # the common case; the parser costs ~50 us
        return "", header_value
    _check_header("Address", header_value)
    found = getaddresses([header_value])
    name, address = found[0] if len(found) == 1 else ("", "")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or " " in address or "@" in local and '"' not in local:
        raise PermanentSendError(f"not an email address: {header_value!r}")
    if local.isascii() and not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise PermanentSendError(f"invalid domain in {header_value!r}: {exc}") from None
        address = f"{local}@{domain}"
    return name, address


def _validated(payload: Any) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    if not isinstance(payload, dict):
        raise PermanentSendError("an email payload must be a JSON object")
    for field in ("subject", "text"):
        if not isinstance(payload.get(field), str):
            raise PermanentSendError(f"payload {field!r} must be a string")
    if "html" in payload and not isinstance(payload["html"], str):
        raise PermanentSendError("payload 'html' must be a string")
    headers = payload.get("headers") or {}
    if not isinstance(headers, dict):
        raise PermanentSendError("payload 'headers' must be an object")
    extra = {str(k): str(v) for k, v in headers.items()}
    for name, value in extra.items():
        if name.lower() in _RESERVED_HEADERS:
            raise PermanentSendError(f"payload header {name!r} is set by the relay")
        _check_header(name, value)
    _check_header("Subject", payload["subject"])
    return payload, _recipients(payload.get("to")), extra


def render_email(payload: Any, *, message_id: uuid.UUID, mail_from: str) -> RenderedEmail:
    """The bytes of the mail for an ``email`` payload; a malformed payload is a permanent failure.

    Building a message with the ``email`` package's policy machinery costs about 1 ms of CPU,
    more than handing it to the server, so the common case (ASCII addresses) is serialised here
    directly: fixed headers, RFC 2047 for a non-ASCII or long subject, 7bit or base64 bodies.
    Every header value is checked for CR, LF and other control characters first, so user data
    cannot add or change headers. Non-ASCII addresses (SMTPUTF8) take the ``email`` package path.
    """
    payload, to, extra = _validated(payload)
    sender_header = payload.get("from") or mail_from
    if not isinstance(sender_header, str):
        raise PermanentSendError("payload 'from' must be a string")
    addresses = [_address(sender_header)] + [_address(a) for a in to]
    if not all(addr.isascii() for _, addr in addresses):
        return _render_with_email_package(payload, to, extra, message_id, mail_from)
    (_, sender), recipients = addresses[0], [a for _, a in addresses[1:]]
    head = [
        f"From: {_format_address(*addresses[0])}",
        _address_list("To", [_format_address(n, a) for n, a in addresses[1:]]),
        f"Subject: {_encode_subject(payload['subject'])}",
        f"Date: {formatdate(usegmt=True)}",
        f"Message-ID: {message_id_header(message_id, mail_from)}",
        "MIME-Version: 1.0",
    ]
    head += [f"{name}: {_encode_subject(value)}" for name, value in extra.items()]
    html_body = payload.get("html")
    if html_body is None:
        head += _text_part_headers("plain", payload["text"])
        body = _text_part_body(payload["text"])
    else:
        boundary = f"=_outbox_{message_id.hex}"
        head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        parts = []
        for subtype, content in (("plain", payload["text"]), ("html", html_body)):
            part_head = "\r\n".join(_text_part_headers(subtype, content))
            parts.append(f"--{boundary}\r\n{part_head}\r\n\r\n{_text_part_body(content)}")
        body = "\r\n".join(parts) + f"\r\n--{boundary}--\r\n"
    data = ("\r\n".join(head) + "\r\n\r\n" + body).encode("ascii")
    return RenderedEmail(sender, recipients, data)


def _format_address(name: str, address: str) -> str:
    if not name:
        return address
    return formataddr((name, address), charset="utf-8")


def _address_list(field: str, addresses: list[str]) -> str:
    """``To: a, b, c`` folded after a comma wherever the next address would take the line past
    78 characters (RFC 5322 2.1.1). Unfolded, about 45 recipients made a line the server refused
    (``500 Line too long``: SMTP's limit is 998), and the message went dead."""
    head = f"{field}:"
    if len(addresses) == 1:  # the common case, on every send: skip the loop
        return f"{head} {addresses[0]}"
    lines: list[str] = []
    line = head
    last = len(addresses) - 1
    for i, address in enumerate(addresses):
        piece = address if i == last else address + ","
        if line != head and len(line) + 1 + len(piece) > 78:
            lines.append(line)
            line = ""
        line += " " + piece
    lines.append(line)
    return "\r\n".join(lines)


def _encode_subject(value: str) -> str:
    if value.isascii() and len(value) <= 900:
        return value
    return Header(value, "utf-8", maxlinelen=76).encode(linesep="\r\n")


def _needs_base64(text: str) -> bool:
    return not text.isascii() or any(len(line) > 990 for line in text.splitlines())


def _text_part_headers(subtype: str, text: str) -> list[str]:
    encoding = "base64" if _needs_base64(text) else "7bit"
    return [
        f'Content-Type: text/{subtype}; charset="utf-8"',
        f"Content-Transfer-Encoding: {encoding}",
    ]


def _text_part_body(text: str) -> str:
    if _needs_base64(text):
        return base64.encodebytes(text.encode("utf-8")).decode("ascii").replace("\n", "\r\n")
    body = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    return body if body.endswith("\r\n") else body + "\r\n"


def _render_with_email_package(
    payload: dict[str, Any],
    to: list[str],
    extra: dict[str, str],
    message_id: uuid.UUID,
    mail_from: str,
) -> RenderedEmail:
    """The general path: internationalised addresses, sent with SMTPUTF8."""
    try:
        msg = EmailMessage(policy=SMTPUTF8)
        msg["From"] = payload.get("from") or mail_from
        msg["To"] = ", ".join(to)
        msg["Subject"] = payload["subject"]
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = message_id_header(message_id, mail_from)
        for name, value in extra.items():
            msg[name] = value
        msg.set_content(payload["text"])
        if "html" in payload:
            msg.add_alternative(payload["html"], subtype="html")
        data = msg.as_bytes()
    except (ValueError, TypeError, IndexError) as exc:
        raise PermanentSendError(f"the mail cannot be built: {exc}") from exc
    sender = _address(str(payload.get("from") or mail_from))[1]
    return RenderedEmail(sender, [_address(a)[1] for a in to], data, smtputf8=True)


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


@dataclass(slots=True)
class _Delivery:
    """What the server did with one mail's recipients, over all its transactions."""

    total: int
    accepted: int = 0
    replies: list[str] = _field(default_factory=list)
    refused: dict[str, aiosmtplib.SMTPResponse] = _field(default_factory=dict)

    def result(self) -> str:
        """The server's reply when every recipient has the mail (kept as the row's ``result``).

        Otherwise a permanent failure naming the refused recipients (the message goes dead with
        it as ``last_error``): the accepted recipients already have the mail, and retrying it
        would send each of them another copy on every attempt, so nothing is retried
        automatically (see the README's failure table).
        """
        reply = "; ".join(self.replies)
        if not self.refused:
            return reply
        refused = "; ".join(f"{rcpt}: {r.code} {r.message}" for rcpt, r in self.refused.items())
        raise PermanentSendError(
            f"delivered to {self.accepted} of {self.total} recipients ({reply}); not retried, "
            f"which would send the others a copy each time; refused: {refused}"
        )


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
        mail = render_email(
            message.payload, message_id=message.message_id, mail_from=self._mail_from
        )
        client = await self._slots.get()
        keep = False
        try:
            async with asyncio.timeout(self._timeout):
                if client is not None and client.is_connected:
                    try:
                        delivery = await self._send(client, mail)
                        keep = True
                        return delivery.result()
                    except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                        if client.body_started:
                            raise
                        # The server closed an idle pooled connection: nothing was sent yet,
                        # so try once more on a fresh one instead of spending an attempt.
                        client.close()
                client = self._new_client()
                await client.connect()
                delivery = await self._send(client, mail)
                keep = True
                return delivery.result()
        except aiosmtplib.SMTPRecipientsRefused as exc:
            keep = True
            codes = [r.code for r in exc.recipients]
            error = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if all(code >= 500 for code in codes):
                raise PermanentSendError(f"all recipients refused: {error}") from exc
            raise TransientSendError(f"recipients refused: {error}") from exc
        except aiosmtplib.SMTPResponseException as exc:
            keep = exc.code != 421  # 421: the server is closing the connection
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
            reason = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc}"
            if client is not None and client.body_started:
                raise AmbiguousSendError(
                    f"SMTP connection {reason} after the message body was sent; the server "
                    "may have accepted it (retrying with the same Message-ID)"
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

    async def _send(self, client: _TrackingSMTP, mail: RenderedEmail) -> _Delivery:
        """Hand ``mail`` over: one SMTP transaction, or more when the server limits recipients."""
        client.body_started = False
        options = ["SMTPUTF8", "BODY=8BITMIME"] if mail.smtputf8 else None
        refused, _ = await client.sendmail(
            mail.sender, mail.recipients, mail.data, mail_options=options
        )
        total = len(mail.recipients)
        delivery = _Delivery(total, total - len(refused), [client.last_reply])
        if refused:
            await self._send_rest(client, mail, options, delivery, refused)
        return delivery

    async def _send_rest(
        self,
        client: _TrackingSMTP,
        mail: RenderedEmail,
        options: list[str] | None,
        delivery: _Delivery,
        refused: dict[str, aiosmtplib.SMTPResponse],
    ) -> None:
        """After a transaction refused some recipients, decide about each of them.

        A server that limits recipients per transaction answers ``452`` (RFC 5321 4.5.3.1.10:
        "too many recipients") to the RCPTs past its limit, and the client is to send the mail
        to those in another transaction; so recipients refused with 452 are tried again at once,
        as long as each transaction gets the mail to at least one more of them. Every other
        refusal, and a 452 that makes no progress, goes into ``delivery.refused``.
        """
        tried = len(mail.recipients)
        while refused:
            progress = len(refused) < tried
            again = [r for r, reply in refused.items() if progress and reply.code == 452]
            retried = set(again)
            delivery.refused.update({r: reply for r, reply in refused.items() if r not in retried})
            if not again:
                return
            tried = len(again)
            try:
                refused, _ = await client.sendmail(
                    mail.sender, again, mail.data, mail_options=options
                )
            except aiosmtplib.SMTPRecipientsRefused as exc:  # every one of them, this time
                refused = {
                    r.recipient: aiosmtplib.SMTPResponse(r.code, r.message) for r in exc.recipients
                }
            else:
                delivery.accepted += tried - len(refused)
                delivery.replies.append(client.last_reply)

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
