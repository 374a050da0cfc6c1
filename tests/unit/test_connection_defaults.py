"""The connection defaults (keepalives, timeouts) give way to what a database URL names."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url

from outbox.db import CONNECTION_DEFAULTS, connection_defaults


def test_defaults_apply_when_the_url_names_none() -> None:
    given = conninfo_to_dict("postgresql://u@127.0.0.1:5432/db")
    assert connection_defaults(given) == CONNECTION_DEFAULTS


def test_a_setting_in_a_libpq_url_wins() -> None:
    given = conninfo_to_dict("postgresql://u@h/db?connect_timeout=3&tcp_user_timeout=5000")
    args = connection_defaults(given)
    assert "connect_timeout" not in args and "tcp_user_timeout" not in args
    assert args["keepalives_idle"] == CONNECTION_DEFAULTS["keepalives_idle"]


def test_a_setting_in_an_sqlalchemy_url_wins() -> None:
    args = connection_defaults(make_url("postgresql+psycopg://u@h/db?keepalives_idle=60").query)
    assert "keepalives_idle" not in args
    assert args["connect_timeout"] == CONNECTION_DEFAULTS["connect_timeout"]
