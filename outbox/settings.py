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
    """The same URL spelt for libpq (psycopg.connect, psql), without the SQLAlchemy driver and
    without our ``pgbouncer`` marker (libpq refuses query parameters it does not know)."""
    return (
        "postgresql://" + split_pgbouncer_marker(normalise_database_url(url))[0].partition("://")[2]
    )


def split_pgbouncer_marker(url: str) -> tuple[str, bool]:
    """``url`` without its ``pgbouncer=true|false`` query parameter, and what it said.

    ``?pgbouncer=true`` on a database URL says that it points at PgBouncer in transaction pooling
    mode (see ``outbox.db.create_engine``). It travels with the URL, so every process that reads
    ``DATABASE_URL`` (web, relay, CLI) learns it without a second variable; it is removed before
    any driver sees the URL.
    """
    base, sep, query = url.partition("?")
    if not sep:
        return url, False
    kept: list[str] = []
    marked = False
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if name != "pgbouncer":
            if item:
                kept.append(item)
            continue
        if value.lower() not in _TRUE | _FALSE:
            raise ConfigError(f"pgbouncer= in a database URL must be true or false, not {value!r}")
        marked = value.lower() in _TRUE
    return base + ("?" + "&".join(kept) if kept else ""), marked


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


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
    # A direct (not pooled) PostgreSQL URL for the relay's LISTEN connection, for when
    # DATABASE_URL goes through PgBouncer in transaction pooling mode (OUTBOX_LISTEN_URL).
    listen_url: str | None = None
    # Rate limits of the signup app ("20/hour", "5/10m", "off"); parsed by web.ratelimit.
    rate_limit_per_ip: str = "30/hour"
    rate_limit_per_email: str = "5/hour"

    def __post_init__(self) -> None:
        if self.database_url is not None:
            object.__setattr__(self, "database_url", normalise_database_url(self.database_url))
            split_pgbouncer_marker(self.database_url)  # validates the marker
        if self.listen_url is not None:
            listen_url = normalise_database_url(self.listen_url)
            if split_pgbouncer_marker(listen_url)[1]:
                raise ConfigError(
                    "OUTBOX_LISTEN_URL must be a direct connection: LISTEN does not work "
                    "through PgBouncer's transaction pooling"
                )
            object.__setattr__(self, "listen_url", listen_url)
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
            notify=(get("OUTBOX_NOTIFY") or "true").lower() not in _FALSE,
            listen_url=get("OUTBOX_LISTEN_URL"),
            rate_limit_per_ip=get("RATE_LIMIT_PER_IP") or cls.rate_limit_per_ip,
            rate_limit_per_email=get("RATE_LIMIT_PER_EMAIL") or cls.rate_limit_per_email,
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
    def behind_pgbouncer(self) -> bool:
        """Whether ``DATABASE_URL`` carries ``?pgbouncer=true`` (transaction pooling)."""
        return self.database_url is not None and split_pgbouncer_marker(self.database_url)[1]

    @property
    def smtp(self) -> SmtpConfig:
        self.require("smtp_url")
        assert self.smtp_url is not None
        return SmtpConfig.from_url(self.smtp_url)
