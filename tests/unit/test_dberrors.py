"""Database errors are classified by SQLSTATE, and outcomes are made storable."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy.exc

from outbox.dberrors import drops_session, is_infrastructure_error, sqlstate
from outbox.outcome import describe, storable, stored_result


def wrapped(state: str) -> sqlalchemy.exc.DBAPIError:
    """A psycopg error with ``state``, wrapped as SQLAlchemy raises it."""
    error = psycopg.errors.lookup(state)("boom")
    return sqlalchemy.exc.DBAPIError("SELECT 1", None, error)


@pytest.mark.parametrize(
    ("state", "infrastructure", "drop"),
    [
        ("25006", True, True),  # read-only: a standby after a failover
        ("57P01", True, True),  # admin shutdown
        ("57P03", True, True),  # cannot connect now
        ("08006", True, True),  # connection failure
        ("40001", True, False),  # serialization
        ("40P01", True, False),  # deadlock
        ("53100", True, False),  # disk full
        ("23505", False, False),  # a unique violation is a bug, not the infrastructure
        ("22021", False, False),  # a NUL byte in text: the outcome's fault, cleaned beforehand
    ],
)
def test_database_errors_are_classified_by_sqlstate(
    state: str, infrastructure: bool, drop: bool
) -> None:
    exc = wrapped(state)
    assert sqlstate(exc) == state
    assert is_infrastructure_error(exc) is infrastructure
    assert drops_session(exc) is drop


def test_outcomes_are_made_storable() -> None:
    assert storable("bad\x00byte") == "bad\\x00byte"
    assert storable("broken \udcff text") == "broken \\udcff text"
    assert storable("x" * 5000) == "x" * 2000
    assert stored_result({"a": 1}) == "{'a': 1}"
    assert stored_result(None) is None
    assert describe(SystemExit(3)) == "SystemExit: 3"
    assert describe(ValueError("a\x00b")) == "ValueError: a\\x00b"
