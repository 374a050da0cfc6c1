"""Configuration: read the environment once, into one frozen object.

Only this module touches ``os.environ``; everything else receives values through constructors, so
tests build a ``Settings`` from a plain dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, unquote, urlsplit

from outbox.errors import ConfigError

_ASYNC_DRIVER = "postgresql+psycopg"
_ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg_async")


def normalise_database_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver, whichever accepted spelling it came in."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _ACCEPTED_SCHEMES:
        raise ConfigError(
            f"DATABASE_URL must start with postgresql://, postgres:// or {_ASYNC_DRIVER}://"
        )
    return f"{_ASYNC_DRIVER}://{rest}"


def libpq_url(url: str) -> str:
    """The same URL spelt for libpq (psycopg.connect, psql), without the SQLAlchemy driver."""
    return "postgresql://" + normalise_database_url(url).partition("://")[2]


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to hand mail over: parsed from ``SMTP_URL``."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    use_tls: bool = False
    start_tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> SmtpConfig:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ConfigError(
                "SMTP_URL must look like smtp://[user:pass@]host[:port] or smtps://..."
            )
        query = parse_qs(parts.query)
        start_tls = query.get("starttls", ["false"])[0].lower() in ("1", "true", "yes")
        implicit_tls = parts.scheme == "smtps"
        try:
            port = parts.port or (465 if implicit_tls else 25)
        except ValueError as exc:
            raise ConfigError(f"SMTP_URL has an invalid port: {exc}") from None
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            use_tls=implicit_tls,
            start_tls=start_tls and not implicit_tls,
        )


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment (see the README's table)."""

    database_url: str | None = None
    smtp_url: str | None = None
    mail_from: str = "noreply@localhost"
    site_name: str = "Outbox Demo"
    base_url: str = "http://127.0.0.1:8000"
    secret_key: str | None = None
    old_secret_keys: tuple[str, ...] = ()
    token_max_age_s: int = 48 * 3600
    notify: bool = True
    # Rate limits of the signup app ("20/hour", "5/10m", "off"); parsed by web.ratelimit.
    rate_limit_per_ip: str = "30/hour"
    rate_limit_per_email: str = "5/hour"
    # --- web app, issue 11 (security): to move with the app's settings ----------------------
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto `outbox web` believes: comma-separated
    # addresses or networks ("10.0.0.5", "10.0.0.0/8"), or "*". None: no proxy is trusted, the
    # client is the TCP peer (uvicorn alone would trust 127.0.0.1).
    trusted_proxies: str | None = None
    # --- end of the web app's block --------------------------------------------------------

    def __post_init__(self) -> None:
        if self.database_url is not None:
            object.__setattr__(self, "database_url", normalise_database_url(self.database_url))
        if self.smtp_url is not None:
            SmtpConfig.from_url(self.smtp_url)  # validates
        if "@" not in self.mail_from:
            raise ConfigError("MAIL_FROM must be an email address")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError("BASE_URL must start with http:// or https://")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.token_max_age_s <= 0:
            raise ConfigError("TOKEN_MAX_AGE must be a positive number of seconds")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        max_age = get("TOKEN_MAX_AGE")
        try:
            max_age_s = int(max_age) if max_age else cls.token_max_age_s
        except ValueError:
            raise ConfigError("TOKEN_MAX_AGE must be a whole number of seconds") from None
        old_keys = tuple(k.strip() for k in (get("OLD_SECRET_KEYS") or "").split(",") if k.strip())
        return cls(
            database_url=get("DATABASE_URL"),
            smtp_url=get("SMTP_URL"),
            mail_from=get("MAIL_FROM") or cls.mail_from,
            site_name=get("SITE_NAME") or cls.site_name,
            base_url=get("BASE_URL") or cls.base_url,
            secret_key=get("SECRET_KEY"),
            old_secret_keys=old_keys,
            token_max_age_s=max_age_s,
            notify=(get("OUTBOX_NOTIFY") or "true").lower() not in ("0", "false", "no", "off"),
            rate_limit_per_ip=get("RATE_LIMIT_PER_IP") or cls.rate_limit_per_ip,
            rate_limit_per_email=get("RATE_LIMIT_PER_EMAIL") or cls.rate_limit_per_email,
            trusted_proxies=get("TRUSTED_PROXIES"),
        )

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with some fields replaced (used by ``outbox dev`` to fill in its defaults)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def require(self, *names: str) -> None:
        """Raise ``ConfigError`` naming the first of ``names`` (field names) that is unset."""
        for name in names:
            if getattr(self, name) is None:
                raise ConfigError(f"{name.upper()} is required (set it in the environment)")

    @property
    def smtp(self) -> SmtpConfig:
        self.require("smtp_url")
        assert self.smtp_url is not None
        return SmtpConfig.from_url(self.smtp_url)
