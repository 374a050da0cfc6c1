"""Double-submit CSRF protection for the HTML forms, with tokens signed by the app's secret.

A token lives in a cookie (HttpOnly, SameSite=Lax) and in a hidden field of every form we render;
a form POST is accepted only when both are present, equal, and the token carries a valid HMAC of
``SECRET_KEY`` (or of one of ``OLD_SECRET_KEYS``). Another site can make a browser post a form to
us, but it can neither read our cookie nor set the matching field.

Why signed (issue 11, finding 8): with plain random tokens, whoever can plant a cookie for our
host (a sibling subdomain, a man in the middle on plain http) picks a value and submits the same
one. Now a planted value must be a token we issued. Over https the cookie is also named
``__Host-csrftoken``: browsers accept that name only from our own host, with ``Secure`` and
``Path=/`` and no ``Domain``, so a sibling subdomain cannot plant it at all.

JSON posts skip this: they must be ``Content-Type: application/json``, which a cross-site HTML
form cannot send and cross-site ``fetch`` can only send after a CORS preflight we never approve.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from web.settings import Settings

COOKIE_NAME = "csrftoken"
SECURE_COOKIE_NAME = "__Host-csrftoken"
FIELD_NAME = "csrf_token"
_NONCE_BYTES = 16
_MAX_LENGTH = 100  # a real token is 66 characters


def cookie_name(settings: Settings) -> str:
    """``__Host-csrftoken`` when the site is served over https, else ``csrftoken``."""
    return SECURE_COOKIE_NAME if is_https(settings) else COOKIE_NAME


def is_https(settings: Settings) -> bool:
    return settings.link_base.startswith("https://")


def _keys(settings: Settings) -> list[bytes]:
    keys = [settings.secret_key or "", *settings.old_secret_keys]
    return [k.encode() for k in keys if k]


def _signature(key: bytes, nonce: str) -> str:
    digest = hmac.new(key, b"csrf:" + nonce.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _signed(settings: Settings, token: str | None) -> bool:
    if token is None or len(token) > _MAX_LENGTH or not token.isascii():
        return False
    nonce, dot, signature = token.partition(".")
    if not dot or not nonce:
        return False
    return any(hmac.compare_digest(_signature(key, nonce), signature) for key in _keys(settings))


def token_for(request: Request[Any], settings: Settings) -> str:
    """The token to put in the page: the browser's current one if we signed it, or a new one."""
    current = request.cookies.get(cookie_name(settings))
    if _signed(settings, current):
        assert current is not None
        return current
    nonce = secrets.token_urlsafe(_NONCE_BYTES)
    return f"{nonce}.{_signature(_keys(settings)[0], nonce)}"


def set_cookie(response: Response, token: str, settings: Settings) -> None:
    """Send the token cookie (a session cookie: it lives as long as the browser window)."""
    response.set_cookie(
        cookie_name(settings),
        token,
        path="/",
        httponly=True,
        samesite="lax",
        secure=is_https(settings),
    )


def is_valid(request: Request[Any], submitted: str | None, settings: Settings) -> bool:
    """True when the form's token equals the cookie's and carries our signature."""
    cookie = request.cookies.get(cookie_name(settings))
    if cookie is None or submitted is None or not _signed(settings, cookie):
        return False
    return hmac.compare_digest(cookie.encode(), submitted.encode("utf-8", "surrogatepass"))


__all__ = [
    "COOKIE_NAME",
    "FIELD_NAME",
    "SECURE_COOKIE_NAME",
    "cookie_name",
    "is_https",
    "is_valid",
    "set_cookie",
    "token_for",
]
