"""/dev/mail: the mails ``outbox dev``'s capture server received, readable in the browser.

Mounted only by ``outbox dev`` (never by ``outbox web``): it shows every mail to anyone who can
reach the server.
"""

from __future__ import annotations

import html
import re

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from web.capture import CapturedMail, CaptureServer

_URL = re.compile(r"https?://[^\s<>\"']+")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ text-align: left; padding: .4rem .6rem; border-bottom: 1px solid #ddd; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: 1rem; border-radius: 6px; }}
.meta td:first-child {{ color: #666; width: 8rem; }}
a {{ color: #0b5fff; }}
</style></head><body>
<p><a href="/dev/mail">All captured mail</a> · <a href="/users/register">Register</a></p>
{body}
</body></html>"""


def _linkify(text: str) -> str:
    """Escape the text, then make its links clickable (the escaped link text is the target)."""
    escaped = html.escape(text)
    return _URL.sub(lambda m: f'<a href="{m.group(0)}">{m.group(0)}</a>', escaped)


def _text_body(mail: CapturedMail) -> str:
    part = mail.message.get_body(preferencelist=("plain",))
    return str(part.get_content()) if part is not None else ""


def dev_mail_routes(capture: CaptureServer) -> list[BaseRoute]:
    async def index(request: Request) -> Response:
        mails = list(enumerate(capture.mails))[::-1]
        if not mails:
            body = (
                "<h1>Captured mail</h1><p>No mail yet. Register, and the relay sends it here.</p>"
            )
        else:
            rows = "".join(
                f'<tr><td><a href="/dev/mail/{i}">{html.escape(str(m.message["Subject"]))}</a>'
                f"</td><td>{html.escape(', '.join(m.rcpt_tos))}</td>"
                f"<td>{m.received_at:%H:%M:%S}</td></tr>"
                for i, m in mails
            )
            body = (
                "<h1>Captured mail</h1><table><tr><th>Subject</th><th>To</th><th>Received</th>"
                f"</tr>{rows}</table>"
            )
        return HTMLResponse(_PAGE.format(title="Captured mail", body=body))

    async def show(request: Request) -> Response:
        mails = capture.mails
        index_ = request.path_params["index"]
        if index_ >= len(mails):
            body = "<h1>Not found</h1><p>No such mail (the capture keeps the latest 1,000).</p>"
            return HTMLResponse(_PAGE.format(title="Not found", body=body), status_code=404)
        mail = mails[index_]
        msg = mail.message
        meta = "".join(
            f"<tr><td>{name}</td><td>{html.escape(str(msg[name] or ''))}</td></tr>"
            for name in ("From", "To", "Subject", "Date", "Message-ID")
        )
        body = (
            f"<h1>{html.escape(str(msg['Subject']))}</h1>"
            f'<table class="meta">{meta}</table><pre>{_linkify(_text_body(mail))}</pre>'
        )
        return HTMLResponse(_PAGE.format(title=html.escape(str(msg["Subject"])), body=body))

    return [
        Route("/dev/mail", index, methods=["GET"]),
        Route("/dev/mail/{index:int}", show, methods=["GET"]),
    ]
