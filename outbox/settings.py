"""What the library's processes (``outbox relay``, ``migrate``, ``status`` ...) read from the
environment.

Only the CLI calls ``Settings.from_env``; library objects (``Relay``, the email handler,
``enqueue``) take plain values, so an embedding app configures them however it configures itself.
The signup app has settings of its own (``web.settings``): nothing here knows about its secrets,
links or limits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
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


_SMTP_OPTIONS = frozenset({"starttls"})


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
        """Parse ``smtp://[user:pass@]host[:port][?starttls=true]`` or ``smtps://...``.

        An option we do not know is an error rather than ignored: ``?tls=true`` silently sending
        in plain text is the mistake this guards against.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ConfigError(
                "SMTP_URL must look like smtp://[user:pass@]host[:port] or smtps://..."
            )
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - _SMTP_OPTIONS)
        if unknown:
            raise ConfigError(
                f"SMTP_URL has unknown option(s) {', '.join(unknown)}: only ?starttls=true is "
                "understood (use smtps:// for implicit TLS)"
            )
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


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """``env[name]`` stripped, with an empty value counted as unset."""
    value = env.get(name, "").strip()
    return value or None


@dataclass(frozen=True)
class Settings:
    """The library processes' configuration (README, "Production"): database, mail, sender."""

    database_url: str | None = None
    smtp_url: str | None = None
    mail_from: str = "noreply@localhost"

    def __post_init__(self) -> None:
        if self.database_url is not None:
            object.__setattr__(self, "database_url", normalise_database_url(self.database_url))
        if self.smtp_url is not None:
            SmtpConfig.from_url(self.smtp_url)  # validates
        if "@" not in self.mail_from:
            raise ConfigError("MAIL_FROM must be an email address")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            database_url=env_value(env, "DATABASE_URL"),
            smtp_url=env_value(env, "SMTP_URL"),
            mail_from=env_value(env, "MAIL_FROM") or cls.mail_from,
        )

    def require(self, *names: str) -> None:
        """Raise ``ConfigError`` naming every one of ``names`` (field names) that is unset."""
        missing = [name.upper() for name in names if getattr(self, name) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ConfigError(f"{' and '.join(missing)} {verb} required (set in the environment)")

    @property
    def smtp(self) -> SmtpConfig | None:
        """The parsed ``SMTP_URL``, or ``None``: a relay without it does not serve ``email``."""
        return SmtpConfig.from_url(self.smtp_url) if self.smtp_url is not None else None
