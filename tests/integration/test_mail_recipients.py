"""Wide recipient lists and partial refusals, through the real SMTP sender and capture server.

Before: more than about 45 recipients made an unfolded ``To:`` line that the server refused
(``500 Line too long``, the message went dead), and a mail refused for some recipients was marked
sent, the refusals only noted in ``result``.
"""

from __future__ import annotations

import email
import email.policy
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox import Relay, enqueue
from outbox.errors import PermanentSendError
from outbox.mail import SmtpSender
from outbox.message import OutboxMessage
from outbox.settings import SmtpConfig
from tests.integration.test_relay import MAIL_FROM, email_registry, row
from web.capture import CapturedMail, CaptureServer

SMTP_LINE_LIMIT = 998  # RFC 5321 4.5.3.1.6, without the CRLF


def _message(to: list[str]) -> OutboxMessage:
    return OutboxMessage(
        id=1,
        message_id=uuid.uuid4(),
        topic="email",
        payload={"to": to, "subject": "Wide", "text": "to many"},
        attempts=0,
        created_at=datetime.now(UTC),
    )


async def _send(server: CaptureServer, to: list[str]) -> str:
    sender = SmtpSender(SmtpConfig.from_url(server.url), mail_from=MAIL_FROM, timeout=10)
    try:
        return await sender(_message(to))
    finally:
        await sender.aclose()


def _parsed(mail: CapturedMail) -> EmailMessage:
    # SMTPUTF8 headers are raw UTF-8, which the bytes parser would keep as surrogates.
    parsed = email.message_from_string(mail.raw.decode("utf-8"), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _head_lines(mail: CapturedMail) -> list[bytes]:
    return mail.raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


@pytest.mark.parametrize("local", ["user", "usér"], ids=["ascii", "smtputf8"])
async def test_mail_to_200_recipients_is_folded_and_accepted(
    smtp_server: CaptureServer, local: str
) -> None:
    """200 recipients: one accepted mail, every recipient in the envelope and in ``To:``, no
    header line over SMTP's limit (the fast ASCII path and the SMTPUTF8 one)."""
    to = [f"{local}{n:03d}@example.test" for n in range(200)]
    reply = await _send(smtp_server, to)

    assert reply.startswith("250")
    [mail] = smtp_server.mails
    assert sorted(mail.rcpt_tos) == sorted(to)
    lines = _head_lines(mail)
    assert max(len(line) for line in lines) <= SMTP_LINE_LIMIT
    assert max(len(line) for line in lines if not line.startswith(b"Subject")) <= 78
    assert [a.addr_spec for a in _parsed(mail)["To"].addresses] == to


async def test_mail_past_the_servers_recipient_limit_goes_out_in_more_transactions(
    smtp_server: CaptureServer,
) -> None:
    """A server that takes 100 recipients per transaction answers 452 to the rest (RFC 5321
    4.5.3.1.10): the rest get the mail in further transactions, and it is sent to all 250."""
    smtp_server.max_recipients = 100
    to = [f"user{n:03d}@example.test" for n in range(250)]

    reply = await _send(smtp_server, to)

    mails = smtp_server.mails
    assert [len(m.rcpt_tos) for m in mails] == [100, 100, 50]
    assert sorted(r for m in mails for r in m.rcpt_tos) == sorted(to)
    assert len({m.message_id for m in mails}) == 1, "one message, one Message-ID"
    assert reply.count("250") == 3


async def test_mail_refused_for_some_recipients_is_a_permanent_failure_naming_them(
    smtp_server: CaptureServer,
) -> None:
    """550 for one recipient and a 452 that does not go away for another: the third has the
    mail, and the failure names both refusals with their codes."""
    smtp_server.refuse = {
        "gone@example.test": "550 5.1.1 No such user",
        "full@example.test": "452 4.2.2 Mailbox full",
    }
    with pytest.raises(PermanentSendError) as failure:
        await _send(smtp_server, ["ok@example.test", "gone@example.test", "full@example.test"])

    text = str(failure.value)
    assert "delivered to 1 of 3 recipients" in text
    assert "gone@example.test: 550 5.1.1 No such user" in text
    assert "full@example.test: 452 4.2.2 Mailbox full" in text
    assert [m.rcpt_tos for m in smtp_server.mails] == [("ok@example.test",)]


async def test_relay_does_not_mark_a_partly_refused_mail_sent(
    engine: AsyncEngine, smtp_server: CaptureServer
) -> None:
    """Through the relay: the row is dead, not sent, with the refusal in ``last_error``; it is
    not retried (the accepted recipient would get a copy on every attempt)."""
    smtp_server.refuse = {"gone@example.test": "550 5.1.1 No such user"}
    async with engine.begin() as conn:
        await enqueue(
            conn,
            topic="email",
            payload={"to": ["ok@example.test", "gone@example.test"], "subject": "S", "text": "T"},
        )

    result = await Relay(engine, email_registry(smtp_server)).drain()

    assert (result.sent, result.dead) == (0, 1)
    stored = await row(engine, "SELECT sent_at, dead_at, attempts, last_error FROM outbox")
    assert stored["sent_at"] is None and stored["dead_at"] is not None
    assert stored["attempts"] == 1
    assert "gone@example.test: 550 5.1.1 No such user" in str(stored["last_error"])
    assert len(smtp_server.mails) == 1
