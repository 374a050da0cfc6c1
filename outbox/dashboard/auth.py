"""The dashboard's session, CSRF token and login throttle.

One cookie carries both: a value signed with itsdangerous holding a random CSRF token and, once
the password was given, ``"auth": true``. Every page puts the token in its forms and every POST
must send it back equal to the cookie's, so another site cannot make an operator's browser
retry or discard anything (it can neither read the cookie nor forge its signature). The cookie
is ``HttpOnly``, ``SameSite=Strict``, scoped to the dashboard's own path, and ``Secure`` when the
page came over https. Its signature expires after ``SESSION_MAX_AGE_S``.

The signing key is random per process unless the embedding app passes one: ``outbox admin`` is
one process, and a restart simply asks for the password again. An app served by several worker
processes passes its own secret so that every worker accepts every worker's cookie.

The login throttle is kept in memory, per client address: it holds for one process. Several
processes each keep their own count, so the bound multiplies by their number.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE_NAME = "outbox_admin"
CSRF_FIELD = "csrf_token"
SESSION_MAX_AGE_S = 12 * 3600
_SALT = "outbox-dashboard-session"


@dataclass(frozen=True, slots=True)
class Session:
    csrf: str
    authenticated: bool


class SessionCodec:
    """Sign and check the session cookie's value."""

    def __init__(self, secret_key: str | None) -> None:
        self._serializer = URLSafeTimedSerializer(
            secret_key or secrets.token_urlsafe(32), salt=_SALT
        )

    def load(self, value: str | None) -> Session | None:
        """The session in ``value``; ``None`` when absent, tampered with or expired."""
        if not value:
            return None
        try:
            data = self._serializer.loads(value, max_age=SESSION_MAX_AGE_S)
        except BadSignature:  # also SignatureExpired, its subclass
            return None
        if not (isinstance(data, dict) and isinstance(data.get("csrf"), str)):
            return None
        return Session(csrf=data["csrf"], authenticated=data.get("auth") is True)

    def dump(self, session: Session) -> str:
        return self._serializer.dumps({"csrf": session.csrf, "auth": session.authenticated})


def new_session(*, authenticated: bool) -> Session:
    """A fresh session (a new CSRF token too: logging in never keeps a token seen before)."""
    return Session(csrf=secrets.token_urlsafe(32), authenticated=authenticated)


def csrf_matches(session: Session | None, submitted: Any) -> bool:
    """True when the form's token equals the session's, compared in constant time."""
    if session is None or not isinstance(submitted, str):
        return False
    return hmac.compare_digest(session.csrf.encode(), submitted.encode())


def password_matches(expected: str, given: str) -> bool:
    """Compare digests, so neither the length nor a common prefix shows in the timing."""
    return hmac.compare_digest(
        hashlib.sha256(expected.encode()).digest(), hashlib.sha256(given.encode()).digest()
    )


@dataclass
class LoginThrottle:
    """At most ``limit`` failed logins per client address within ``window_s`` seconds; further
    attempts are refused (without checking the password) until the oldest failure ages out."""

    limit: int = 5
    window_s: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        now = self.clock()
        failures = self._failures.get(client)
        if failures is None:
            return 0.0
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return 0.0
        if len(failures) < self.limit:
            return 0.0
        return failures[0] + self.window_s - now

    def failed(self, client: str) -> None:
        self._failures.setdefault(client, deque()).append(self.clock())
        if len(self._failures) > 10_000:  # a flood of addresses: forget the quietest half
            for key in sorted(self._failures, key=lambda k: self._failures[k][-1])[:5_000]:
                del self._failures[key]

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


__all__ = [
    "COOKIE_NAME",
    "CSRF_FIELD",
    "LoginThrottle",
    "Session",
    "SessionCodec",
    "csrf_matches",
    "new_session",
    "password_matches",
]
