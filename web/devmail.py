"""/dev/mail: the mails ``outbox dev``'s capture server received, readable in the browser.

Mounted only by ``outbox dev`` (never by ``outbox web``): it shows every mail to anyone who can
reach the server.

The pages extend the app's base template, so they follow the browser's dark mode and its
colours (checked for contrast by tests/unit/test_contrast.py), and fit a phone's width: long
links and Message-IDs wrap instead of widening the page. A mail's HTML part is shown as the
reader's client would show it, in an iframe whose ``srcdoc`` holds it and whose empty
``sandbox`` runs none of its scripts, submits none of its forms and gives it no access to this
page; the page's CSP (``default-src 'none'``, inherited by the frame) also keeps it from
loading anything, as a tracking pixel would.
"""

from __future__ import annotations

import re

from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from web import pages
from web.capture import CapturedMail, CaptureServer

_URL = re.compile(r"https?://[^\s<>\"']+")
_META = ("From", "To", "Subject", "Date", "Message-ID")


def _linkify(text: str) -> Markup:
    """Escape the text, then make its links clickable (the escaped link text is the target)."""
    escaped = str(escape(text))
    return Markup(_URL.sub(lambda m: f'<a href="{m.group(0)}">{m.group(0)}</a>', escaped))


def _part(mail: CapturedMail, kind: str) -> str | None:
    """The mail's ``text/plain`` or ``text/html`` body, or ``None`` when it has none."""
    part = mail.message.get_body(preferencelist=(kind,))
    return str(part.get_content()) if part is not None else None


def dev_mail_routes(capture: CaptureServer) -> list[BaseRoute]:
    async def index(request: Request) -> Response:
        mails = [
            (i, str(m.message["Subject"] or ""), ", ".join(m.rcpt_tos), f"{m.received_at:%H:%M:%S}")
            for i, m in list(enumerate(capture.mails))[::-1]
        ]
        return pages.render(
            request, "dev_mail.html", settings=request.state["settings"], mails=mails
        )

    async def show(request: Request) -> Response:
        mails = capture.mails
        index_ = request.path_params["index"]
        settings = request.state["settings"]
        if index_ >= len(mails):
            return pages.render(
                request, "dev_mail.html", settings=settings, status_code=404, missing=True
            )
        mail = mails[index_]
        text = _part(mail, "plain")
        return pages.render(
            request,
            "dev_mail.html",
            settings=settings,
            mail=mail,
            meta=[(name, str(mail.message[name] or "")) for name in _META],
            subject=str(mail.message["Subject"] or ""),
            text=_linkify(text) if text is not None else None,
            # Autoescaped into the attribute: the browser unescapes it into the frame's document.
            html=_part(mail, "html"),
        )

    return [
        Route("/dev/mail", index, methods=["GET"]),
        Route("/dev/mail/{index:int}", show, methods=["GET"]),
    ]
