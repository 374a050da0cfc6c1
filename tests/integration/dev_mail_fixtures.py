"""Mails for the /dev/mail tests, delivered over real SMTP to a capture server.

``HOSTILE_HTML`` is an HTML part that tries what a hostile or careless mail could: run a script,
break out of an attribute, load a remote image. ``LONG_LINK`` has no place to break, as a
verification link with its token has none; a page that does not wrap it is wider than a phone.
"""

from __future__ import annotations

import smtplib
import uuid

from outbox.mail import render_email
from web.capture import CaptureServer

MAIL_FROM = "noreply@example.test"
LONG_LINK = "http://127.0.0.1:9/users/verify?token=" + "A1b2C3d4" * 40
SCRIPT_MARK = "the mail's script ran"
HOSTILE_HTML = (
    "<!doctype html><html><body>"
    '<p id="first">One more step: confirm your email address.</p>'
    f'<p id="status">no script ran</p><p><a href="{LONG_LINK}">{LONG_LINK}</a></p>'
    '<img src="http://127.0.0.1:9/pixel.png" alt="">'
    f"<script>document.getElementById('status').textContent = \"{SCRIPT_MARK}\";"
    "top.location = 'http://127.0.0.1:9/stolen';</script>"
    "</body></html>"
)


def deliver(capture: CaptureServer, *, subject: str, text: str, html: str | None) -> None:
    """Render the payload as the relay does and hand it to the capture server over SMTP."""
    payload: dict[str, object] = {"to": "reader@example.test", "subject": subject, "text": text}
    if html is not None:
        payload["html"] = html
    rendered = render_email(payload, message_id=uuid.uuid4(), mail_from=MAIL_FROM)
    with smtplib.SMTP(capture.host, capture.port, timeout=10) as smtp:
        smtp.sendmail(MAIL_FROM, ["reader@example.test"], rendered.data)
