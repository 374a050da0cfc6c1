"""The signup app's configuration: read the environment once, into one frozen object.

Only ``from_env`` touches ``os.environ``; everything else receives values through constructors,
so tests build a ``Settings`` from plain values. The library's own processes have their own,
smaller settings (``outbox.settings``); the app borrows only its URL and SMTP parsing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from outbox.errors import ConfigError
from outbox.settings import SmtpConfig, env_value, missing_error, normalise_database_url


@dataclass(frozen=True)
class Settings:
    """Everything the signup app reads from its environment (see the README's table)."""

    database_url: str | None = None
    smtp_url: str | None = None
    mail_from: str = "noreply@localhost"
    site_name: str = "Outbox Demo"
    base_url: str | None = None
    secret_key: str | None = None
    old_secret_keys: tuple[str, ...] = ()
    token_max_age_s: int = 48 * 3600
    notify: bool = True
    # Rate limits ("20/hour", "5/10m", "off"); parsed by web.ratelimit.
    rate_limit_per_ip: str = "30/hour"
    rate_limit_per_email: str = "5/hour"
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto `outbox web` believes: comma-separated
    # addresses or networks ("10.0.0.5", "10.0.0.0/8"), or "*". None: no proxy is trusted, the
    # client is the TCP peer (uvicorn alone would trust 127.0.0.1).
    trusted_proxies: str | None = None

    def __post_init__(self) -> None:
        if self.database_url is not None:
            object.__setattr__(self, "database_url", normalise_database_url(self.database_url))
        if self.smtp_url is not None:
            SmtpConfig.from_url(self.smtp_url)  # validates
        if "@" not in self.mail_from:
            raise ConfigError("MAIL_FROM must be an email address")
        if self.base_url is not None:
            if not self.base_url.startswith(("http://", "https://")):
                raise ConfigError("BASE_URL must start with http:// or https://")
            object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.token_max_age_s <= 0:
            raise ConfigError("TOKEN_MAX_AGE must be a positive number of seconds")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env_value(env, name)

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
            base_url=get("BASE_URL"),
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
        """Raise ``ConfigError`` naming every one of ``names`` (field names) that is unset, at
        once: a deploy that lacks three variables learns it in one run, not three."""
        missing = [name.upper() for name in names if getattr(self, name) is None]
        if missing:
            raise missing_error(missing)

    @property
    def link_base(self) -> str:
        """``BASE_URL``, which the app cannot mail a link without."""
        self.require("base_url")
        assert self.base_url is not None
        return self.base_url
