"""What the library's processes (``outbox relay``, ``migrate``, ``status`` ...) read from the
environment.

Only the CLI calls ``Settings.from_env``; library objects (``Relay``, the email handler,
``enqueue``) take plain values, so an embedding app configures them however it configures itself.
The signup app has settings of its own (``web.settings``): nothing here knows about its secrets,
links or limits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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
        start_tls = query.get("starttls", ["false"])[0].lower() in _TRUE
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


def missing_error(names: Sequence[str], how: str = "set in the environment") -> ConfigError:
    """ "A and B are required (set in the environment)": every missing variable at once, so a
    deploy that lacks three learns it in one run, not three."""
    verb = "is" if len(names) == 1 else "are"
    return ConfigError(f"{' and '.join(names)} {verb} required ({how})")


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
    # A direct (not pooled) PostgreSQL URL for the relay's LISTEN connection, for when
    # DATABASE_URL goes through PgBouncer in transaction pooling mode (OUTBOX_LISTEN_URL).
    listen_url: str | None = None

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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            database_url=env_value(env, "DATABASE_URL"),
            smtp_url=env_value(env, "SMTP_URL"),
            mail_from=env_value(env, "MAIL_FROM") or cls.mail_from,
            listen_url=env_value(env, "OUTBOX_LISTEN_URL"),
        )

    def require(self, *names: str) -> None:
        """Raise ``ConfigError`` naming every one of ``names`` (field names) that is unset."""
        missing = [name.upper() for name in names if getattr(self, name) is None]
        if missing:
            raise missing_error(missing)

    @property
    def behind_pgbouncer(self) -> bool:
        """Whether ``DATABASE_URL`` carries ``?pgbouncer=true`` (transaction pooling)."""
        return self.database_url is not None and split_pgbouncer_marker(self.database_url)[1]

    @property
    def smtp(self) -> SmtpConfig | None:
        """The parsed ``SMTP_URL``, or ``None``: a relay without it does not serve ``email``."""
        return SmtpConfig.from_url(self.smtp_url) if self.smtp_url is not None else None
