"""Settings come from one environment mapping and fail early with the variable's name.

The library's processes read only what they use (``outbox.settings``); the app's settings
(``web.settings``) hold its secret, links and limits.
"""

from __future__ import annotations

import dataclasses

import pytest

from outbox.errors import ConfigError
from outbox.settings import Settings, SmtpConfig, libpq_url, split_pgbouncer_marker
from web.settings import Settings as AppSettings


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"],
)
def test_settings_accept_every_postgres_spelling(url: str) -> None:
    settings = Settings.from_env({"DATABASE_URL": url})
    assert settings.database_url == "postgresql+psycopg://u@h/db"
    assert libpq_url(url) == "postgresql://u@h/db"


def test_settings_library_holds_no_app_setting() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert fields == {"database_url", "smtp_url", "mail_from", "listen_url"}


def test_settings_app_defaults() -> None:
    s = AppSettings.from_env({})
    assert (s.mail_from, s.site_name, s.base_url) == ("noreply@localhost", "Outbox Demo", None)
    assert s.database_url is None and s.secret_key is None


def test_settings_reject_bad_values_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        Settings.from_env({"DATABASE_URL": "mysql://x/y"})
    with pytest.raises(ConfigError, match="SMTP_URL"):
        Settings.from_env({"SMTP_URL": "http://mail"})
    with pytest.raises(ConfigError, match="BASE_URL"):
        AppSettings.from_env({"BASE_URL": "example.com"})


def test_settings_report_every_missing_variable_at_once() -> None:
    with pytest.raises(ConfigError, match="SECRET_KEY and BASE_URL and DATABASE_URL are required"):
        AppSettings.from_env({}).require("secret_key", "base_url", "database_url")


def test_settings_smtp_url_forms() -> None:
    plain = SmtpConfig.from_url("smtp://mail.example:2525")
    assert (plain.host, plain.port, plain.use_tls, plain.start_tls) == (
        "mail.example",
        2525,
        False,
        False,
    )
    tls = SmtpConfig.from_url("smtps://user%40x:p%3Ass@mail.example")
    assert (tls.port, tls.use_tls, tls.username, tls.password) == (465, True, "user@x", "p:ss")
    starttls = SmtpConfig.from_url("smtp://mail.example:587?starttls=true")
    assert starttls.start_tls and not starttls.use_tls


def test_settings_smtp_url_unknown_option_is_an_error_not_plain_text() -> None:
    with pytest.raises(ConfigError, match="unknown option.*tls"):
        SmtpConfig.from_url("smtp://mail.example:465?tls=true")


@pytest.mark.parametrize(
    ("url", "stripped", "marked"),
    [
        ("postgresql://u@h/db", "postgresql://u@h/db", False),
        ("postgresql://u@h/db?pgbouncer=true", "postgresql://u@h/db", True),
        (
            "postgresql://u@h/db?sslmode=require&pgbouncer=1",
            "postgresql://u@h/db?sslmode=require",
            True,
        ),
        (
            "postgresql://u@h/db?pgbouncer=false&sslmode=require",
            "postgresql://u@h/db?sslmode=require",
            False,
        ),
    ],
)
def test_settings_pgbouncer_marker_is_read_and_never_reaches_libpq(
    url: str, stripped: str, marked: bool
) -> None:
    assert split_pgbouncer_marker(url) == (stripped, marked)
    assert libpq_url(url) == stripped
    assert Settings.from_env({"DATABASE_URL": url}).behind_pgbouncer is marked


def test_settings_listen_url_must_be_direct() -> None:
    settings = Settings.from_env({"OUTBOX_LISTEN_URL": "postgres://u@db/app"})
    assert settings.listen_url == "postgresql+psycopg://u@db/app"
    with pytest.raises(ConfigError, match="OUTBOX_LISTEN_URL"):
        Settings.from_env({"OUTBOX_LISTEN_URL": "postgresql://u@bouncer/app?pgbouncer=true"})
    with pytest.raises(ConfigError, match="pgbouncer="):
        Settings.from_env({"DATABASE_URL": "postgresql://u@h/db?pgbouncer=maybe"})
