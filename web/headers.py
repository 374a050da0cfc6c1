"""Security headers on every answer: pages, JSON, redirects, 404s and errors alike.

The pages set their own (web.pages: a CSP that allows their inline style); this middleware adds
whatever an answer lacks, so a JSON error, Starlette's own 404/405 and /metrics carry them too
(issue 11, finding 8). ``Strict-Transport-Security`` is sent only when ``BASE_URL`` is https:
over plain http a browser ignores it, and sent by mistake it would lock a host to https for two
years.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_DEFAULTS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
}
HSTS = "max-age=63072000"


class SecurityHeadersMiddleware:
    """Adds the headers of ``_DEFAULTS`` (and HSTS over https) that a response does not set."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app = app
        self.defaults = dict(_DEFAULTS)
        if https:
            self.defaults["Strict-Transport-Security"] = HSTS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.defaults.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


__all__ = ["HSTS", "SecurityHeadersMiddleware"]
