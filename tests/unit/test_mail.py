"""Building the mail from its payload: headers, Message-ID and refusal of header injection."""

from __future__ import annotations

import uuid

import pytest

from outbox.errors import PermanentSendError
from outbox.mail import build_email, message_id_header

MID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def test_mail_message_id_comes_from_the_row_uuid() -> None:
    mail = build_email(
        {"to": "a@x.test", "subject": "S", "text": "T", "headers": {"X-Tag": "1"}},
        message_id=MID,
        mail_from="Outbox <noreply@example.test>",
    )
    assert mail["Message-ID"] == "<12345678-1234-5678-1234-567812345678@example.test>"
    assert mail["X-Tag"] == "1"
    assert message_id_header(MID, "noreply@localhost").endswith("@localhost>")


def test_mail_with_html_is_multipart_alternative() -> None:
    mail = build_email(
        {"to": ["a@x.test", "b@x.test"], "subject": "S", "text": "T", "html": "<p>T</p>"},
        message_id=MID,
        mail_from="n@x.test",
    )
    assert mail.get_content_type() == "multipart/alternative"
    assert mail["To"] == "a@x.test, b@x.test"


def test_mail_non_ascii_subject_is_encoded() -> None:
    mail = build_email(
        {"to": "a@x.test", "subject": "Grüße, 你好", "text": "ü"},
        message_id=MID,
        mail_from="n@x.test",
    )
    raw = mail.as_bytes()
    assert b"=?utf-8?" in raw
    assert "Grüße".encode() not in raw.split(b"\n\n")[0]


@pytest.mark.parametrize(
    "payload",
    [
        {"to": "a@x.test", "subject": "Hi\r\nBcc: victim@x.test", "text": "T"},
        {"to": "a@x.test\nBcc: victim@x.test", "subject": "S", "text": "T"},
        {"to": "a@x.test", "subject": "S", "text": "T", "headers": {"X-A": "1\r\nBcc: v@x"}},
        {"to": "a@x.test", "subject": "S", "text": "T", "headers": {"Message-ID": "<mine@x>"}},
        {"to": [], "subject": "S", "text": "T"},
        {"subject": "S", "text": "T"},
        "not an object",
    ],
)
def test_mail_bad_or_injecting_payloads_are_permanent_failures(payload: object) -> None:
    with pytest.raises(PermanentSendError):
        build_email(payload, message_id=MID, mail_from="n@x.test")
