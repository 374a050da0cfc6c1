"""HTML pages: the Jinja2 templates, rendered with the CSRF token and safe headers.

Every page carries a form (signup or "send the link again"), so every render also refreshes the
CSRF cookie; the headers keep the pages out of caches and frames and stop the verify URL (which
holds a token) from leaking through ``Referer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from web import csrf
from web.settings import Settings

# Jinja2Templates(directory=...) turns autoescaping on for .html files.
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")

_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
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


__all__ = ["render", "templates"]
