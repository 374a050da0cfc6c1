"""One event, one log line: a database outage logged with its exception stays on one line."""

from __future__ import annotations

import json
import logging
import sys

import psycopg
import pytest
import sqlalchemy
from sqlalchemy.exc import OperationalError

from outbox.logs import JsonFormatter, TextFormatter

DOWN = "postgresql://postgres@127.0.0.1:9/outbox"  # nothing listens there


def record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("outbox.relay", logging.WARNING, __file__, 1, message, args, exc_info)


def real_connection_error() -> BaseException:
    """What SQLAlchemy raises when the database is down: libpq's hint on a line of its own,
    SQLAlchemy's link on another."""
    engine = sqlalchemy.create_engine(DOWN.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("a database answered on port 9")


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()])
def test_a_connection_error_with_exc_info_is_one_line(formatter: logging.Formatter) -> None:
    exc = real_connection_error()
    assert "\n" in str(exc)  # the driver's own text spans lines: what made 3-4 line events

    line = formatter.format(record("database unreachable (%s); reconnecting", exc, exc=exc))

    assert "\n" not in line and "Traceback" not in line
    assert "Connection refused" in line and "reconnecting" in line
    assert "OperationalError" in line
    assert "sqlalche.me" not in line


def test_a_psycopg_error_message_argument_is_folded_onto_one_line() -> None:
    try:
        psycopg.connect(DOWN, connect_timeout=5)
    except psycopg.OperationalError as exc:
        line = TextFormatter().format(record("listen connection lost (%s); polling", exc))
    assert "\n" not in line
    assert line.endswith("); polling")


def test_other_exceptions_keep_their_traceback() -> None:
    try:
        raise ValueError("a handler bug")
    except ValueError:
        exc = sys.exc_info()[1]
    assert exc is not None

    text = TextFormatter().format(record("handler raised %s", "ValueError", exc=exc))
    entry = json.loads(JsonFormatter().format(record("handler raised %s", "ValueError", exc=exc)))

    assert "Traceback (most recent call last)" in text
    assert "Traceback (most recent call last)" in entry["exc"]
