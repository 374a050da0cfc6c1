"""Double-submit CSRF protection for the HTML forms.

A random token lives in a cookie (HttpOnly, SameSite=Lax) and in a hidden field of every form we
render; a form POST is accepted only when both are present and equal. Another site can make a
browser post a form to us, but it can neither read our cookie nor set the matching field.

JSON posts skip this: they must be ``Content-Type: application/json``, which a cross-site HTML
form cannot send and cross-site ``fetch`` can only send after a CORS preflight we never approve.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any, TypeGuard

from starlette.requests import Request
from starlette.responses import Response

COOKIE_NAME = "csrftoken"
FIELD_NAME = "csrf_token"
_TOKEN_BYTES = 32
_TOKEN_LENGTH = 43  # len(secrets.token_urlsafe(32))


def _well_formed(value: str | None) -> TypeGuard[str]:
    return (
        value is not None
        and len(value) == _TOKEN_LENGTH
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)
    )


def token_for(request: Request[Any]) -> str:
    """The token to put in the page: the browser's current one, or a new one."""
    current = request.cookies.get(COOKIE_NAME)
    if current is not None and _well_formed(current):
        return current
    return secrets.token_urlsafe(_TOKEN_BYTES)


def set_cookie(response: Response, token: str, *, secure: bool) -> None:
    """Send the token cookie (a session cookie: it lives as long as the browser window)."""
    response.set_cookie(COOKIE_NAME, token, path="/", httponly=True, samesite="lax", secure=secure)


def is_valid(request: Request[Any], submitted: str | None) -> bool:
    """True when the form's token equals the cookie's, compared in constant time."""
    cookie = request.cookies.get(COOKIE_NAME)
    if _well_formed(cookie) and _well_formed(submitted):
        return hmac.compare_digest(cookie.encode(), submitted.encode())
    return False


__all__ = ["COOKIE_NAME", "FIELD_NAME", "is_valid", "set_cookie", "token_for"]
