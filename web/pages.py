"""HTML pages: the Jinja2 templates, rendered with the CSRF token and safe headers.

Every page carries a form (signup or "send the link again"), so every render also refreshes the
CSRF cookie; the headers keep the pages out of caches and frames and stop the verify URL (which
holds a token) from leaking through ``Referer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.templating import Jinja2Templates

from web import csrf
from web.settings import Settings

# Jinja2Templates(directory=...) turns autoescaping on for .html files.
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")

# The pages' own policy; no-store, no-referrer and nosniff come with every answer of the app
# (web.headers.SecurityHeadersMiddleware).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}


def render(
    request: Request[Any],
    name: str,
    *,
    settings: Settings,
    status_code: int = 200,
    **context: Any,
) -> Response:
    """Render template ``name`` with ``context``, the site name and a CSRF token."""
    token = csrf.token_for(request, settings)
    response = templates.TemplateResponse(
        request,
        name,
        {
            "site_name": settings.site_name,
            "csrf_field": csrf.FIELD_NAME,
            "csrf_token": token,
            **context,
        },
        status_code=status_code,
        headers=_HEADERS,
    )
    csrf.set_cookie(response, token, settings)
    return response


def _accepts(request: Request[Any], media_type: str) -> bool:
    return media_type in request.headers.get("accept", "").lower()


async def http_error(request: Request[Any], exc: Exception) -> Response:
    """Starlette's 404 and 405 (and any other ``HTTPException``): a JSON error (DESIGN.md's
    ``{"error", "field"}``) for a client that asks for JSON, a page in the app's style for a
    browser (its ``Accept`` names ``text/html``), the short plain-text answer for anything else
    (curl). JSON is looked for first: API clients often accept HTML too, browsers never ask for
    JSON. The status and the headers (a 405's ``Allow``) are kept whichever the form."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in {204, 304}:
        return Response(status_code=exc.status_code, headers=exc.headers)
    if _accepts(request, "application/json"):
        return JSONResponse(
            {"error": exc.detail, "field": None},
            status_code=exc.status_code,
            headers=exc.headers,
        )
    if _accepts(request, "text/html"):
        response = render(
            request,
            "http_error.html",
            settings=request.state["settings"],
            status_code=exc.status_code,
            status=exc.status_code,
        )
        response.headers.update(exc.headers or {})
        return response
    return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)


__all__ = ["http_error", "render", "templates"]
