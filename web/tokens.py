"""Signed, expiring verification tokens: the link in the mail proves the reader owns the inbox.

The token is ``itsdangerous``'s URL-safe timed serialisation of ``{"uid": ..., "n": ...}`` under
the salt ``verify-email`` (so a token made for another purpose with the same key is not accepted
here). ``n`` is the account's ``token_nonce`` (web.users): a later signup for the address, while
the account is not verified, draws a new nonce and so voids every link mailed before. The token
carries no address: it is a link in a mail and a line in proxies' access logs, and its payload is
only signed, not encrypted.

Key rotation: itsdangerous takes a list of keys, signs with the last and accepts any, so
``[*OLD_SECRET_KEYS, SECRET_KEY]`` keeps links mailed before a rotation working until they expire.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from itsdangerous import BadData, SignatureExpired, URLSafeTimedSerializer

from outbox.errors import ConfigError
from web.settings import Settings

SALT = "verify-email"
# Real tokens are ~120 characters; refuse absurd input before doing any crypto on it.
_MAX_TOKEN_LENGTH = 1024


class TokenError(Exception):
    """The verification link is not valid."""


class TokenExpiredError(TokenError):
    """The verification link has expired."""


class TokenInvalidError(TokenError):
    """The verification link is malformed or was tampered with."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """Who the token was issued to."""

    user_id: int
    nonce: UUID


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    if settings.secret_key is None:
        raise ConfigError("SECRET_KEY is required (set it in the environment)")
    # Newest last: itsdangerous signs with the last key and verifies with every one.
    keys = [*settings.old_secret_keys, settings.secret_key]
    return URLSafeTimedSerializer(keys, salt=SALT)


def make_token(settings: Settings, *, user_id: int, nonce: UUID) -> str:
    """A fresh token for this user, valid for ``settings.token_max_age_s`` seconds."""
    token = _serializer(settings).dumps({"uid": user_id, "n": nonce.hex})
    return str(token)


def read_token(settings: Settings, token: str) -> TokenClaims:
    """The claims of a valid token; ``TokenExpiredError`` or ``TokenInvalidError`` otherwise."""
    if not token or len(token) > _MAX_TOKEN_LENGTH:
        raise TokenInvalidError()
    try:
        data = _serializer(settings).loads(token, max_age=settings.token_max_age_s)
    except SignatureExpired:  # a subclass of BadData: it must be caught first
        raise TokenExpiredError() from None
    except BadData:
        raise TokenInvalidError() from None
    uid = data.get("uid") if isinstance(data, dict) else None
    nonce = data.get("n") if isinstance(data, dict) else None
    if not isinstance(uid, int) or isinstance(uid, bool) or not isinstance(nonce, str):
        raise TokenInvalidError()
    try:
        return TokenClaims(user_id=uid, nonce=UUID(hex=nonce))
    except ValueError:
        raise TokenInvalidError() from None


__all__ = [
    "SALT",
    "TokenClaims",
    "TokenError",
    "TokenExpiredError",
    "TokenInvalidError",
    "make_token",
    "read_token",
]
