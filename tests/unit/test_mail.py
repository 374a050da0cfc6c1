"""Rendering the mail from its payload: headers, Message-ID, encodings, refusal of injection."""

from __future__ import annotations

import email
import email.policy
import uuid
from email.message import EmailMessage

import pytest

from outbox.errors import PermanentSendError
from outbox.mail import message_id_header, render_email

MID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def parse(payload: object, mail_from: str = "n@x.test") -> EmailMessage:
    rendered = render_email(payload, message_id=MID, mail_from=mail_from)
    assert b"\n" not in rendered.data.replace(b"\r\n", b"")  # CRLF line ends only, as SMTP wants
    # Parse as a mail store would keep it: with local line ends.
    msg = email.message_from_bytes(
        rendered.data.replace(b"\r\n", b"\n"), policy=email.policy.default
    )
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def test_mail_message_id_comes_from_the_row_uuid() -> None:
    msg = parse(
        {"to": "a@x.test", "subject": "S", "text": "T", "headers": {"X-Tag": "1"}},
        mail_from="Outbox <noreply@example.test>",
    )
    assert msg["Message-ID"] == "<12345678-1234-5678-1234-567812345678@example.test>"
    assert msg["From"] == "Outbox <noreply@example.test>"
    assert msg["X-Tag"] == "1"
    assert message_id_header(MID, "noreply@localhost").endswith("@localhost>")


def test_mail_envelope_uses_bare_addresses() -> None:
    rendered = render_email(
        {
            "to": ["Ann <a@x.test>", "b@x.test"],
            "subject": "S",
            "text": "T",
            "from": "Me <m@x.test>",
        },
        message_id=MID,
        mail_from="n@x.test",
    )
    assert (rendered.sender, rendered.recipients) == ("m@x.test", ["a@x.test", "b@x.test"])
    assert not rendered.smtputf8


def test_mail_plain_text_body_round_trips() -> None:
    msg = parse({"to": "a@x.test", "subject": "Hi", "text": "line 1\n.line 2\n"})
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content() == "line 1\n.line 2\n"


def test_mail_with_html_is_multipart_alternative() -> None:
    msg = parse(
        {"to": ["a@x.test", "b@x.test"], "subject": "S", "text": "T", "html": "<p>Grüße</p>"}
    )
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["To"] == "a@x.test, b@x.test"
    html_part = msg.get_body(preferencelist=("html",))
    assert html_part is not None and html_part.get_content() == "<p>Grüße</p>"
    text_part = msg.get_body(preferencelist=("plain",))
    assert text_part is not None and text_part.get_content().strip() == "T"


def test_mail_non_ascii_subject_name_and_body_are_encoded() -> None:
    rendered = render_email(
        {"to": "Zoë <a@x.test>", "subject": "Grüße, 你好", "text": "ünïcödé"},
        message_id=MID,
        mail_from="n@x.test",
    )
    head = rendered.data.split(b"\r\n\r\n")[0]
    assert head.isascii() and b"=?utf-8?" in head
    msg = email.message_from_bytes(rendered.data, policy=email.policy.default)
    assert msg["Subject"] == "Grüße, 你好"
    assert msg["To"].addresses[0].display_name == "Zoë"
    assert msg.get_content().strip() == "ünïcödé"


def test_mail_long_subject_is_folded_not_truncated() -> None:
    subject = "word " * 300
    msg = parse({"to": "a@x.test", "subject": subject, "text": "T"})
    assert msg["Subject"].split() == subject.split()


def test_mail_unicode_address_uses_smtputf8() -> None:
    rendered = render_email(
        {"to": "用户@例子.test", "subject": "S", "text": "T"}, message_id=MID, mail_from="n@x.test"
    )
    assert rendered.smtputf8
    assert rendered.recipients == ["用户@例子.test"]
    assert "用户@例子.test".encode() in rendered.data


def test_mail_idn_domain_is_sent_as_punycode_without_smtputf8() -> None:
    rendered = render_email(
        {"to": "ann@bücher.example", "subject": "S", "text": "T"}, message_id=MID, mail_from="n@x"
    )
    assert not rendered.smtputf8
    assert rendered.recipients == ["ann@xn--bcher-kva.example"]
    assert rendered.data.isascii()


@pytest.mark.parametrize(
    "payload",
    [
        {"to": "a@x.test", "subject": "Hi\r\nBcc: victim@x.test", "text": "T"},
        {"to": "a@x.test", "subject": "Hi\nBcc: victim@x.test", "text": "T"},
        {"to": "a@x.test\nBcc: victim@x.test", "subject": "S", "text": "T"},
        {"to": "a@x.test", "subject": "S", "text": "T", "from": "m@x.test\r\nBcc: v@x"},
        {"to": "a@x.test", "subject": "S", "text": "T", "headers": {"X-A": "1\r\nBcc: v@x"}},
        {"to": "a@x.test", "subject": "S", "text": "T", "headers": {"X-A\r\nBcc": "v"}},
        {"to": "a@x.test", "subject": "S", "text": "T", "headers": {"Message-ID": "<mine@x>"}},
        {"to": "a@x.test", "subject": "S\x00", "text": "T"},
        {"to": "not an address", "subject": "S", "text": "T"},
        {"to": [], "subject": "S", "text": "T"},
        {"subject": "S", "text": "T"},
        {"to": "a@x.test", "subject": 5, "text": "T"},
        "not an object",
    ],
)
def test_mail_bad_or_injecting_payloads_are_permanent_failures(payload: object) -> None:
    with pytest.raises(PermanentSendError):
        render_email(payload, message_id=MID, mail_from="n@x.test")
