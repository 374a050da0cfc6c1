"""Which database errors are the infrastructure's, not the message's, decided by SQLSTATE.

The relay never spends an attempt, and never exits, because of the database: a failover that
leaves it on a read-only standby, an administrator's shutdown, a dropped connection, a
serialization failure or a full disk all end the same way: the short transaction that met the
error is rolled back (a claim that did not commit counted nothing), the relay waits a little
(``outbox.backoff``) and tries again. Errors outside this list are bugs and propagate.
"""

from __future__ import annotations

import psycopg
import sqlalchemy.exc

# SQLSTATE codes (https://www.postgresql.org/docs/current/errcodes-appendix.html) and classes.
READ_ONLY = "25006"  # read_only_sql_transaction: a standby, or default_transaction_read_only
DISK_FULL = "53100"
OUT_OF_MEMORY = "53200"
TOO_MANY_CONNECTIONS = "53300"
SERIALIZATION = "40001"
DEADLOCK = "40P01"
ADMIN_SHUTDOWN = "57P01"
CRASH_SHUTDOWN = "57P02"
CANNOT_CONNECT_NOW = "57P03"
QUERY_CANCELED = "57014"  # statement_timeout, or pg_cancel_backend
IDLE_SESSION_TIMEOUT = "57P05"
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"

_TRANSIENT = frozenset(
    {
        READ_ONLY,
        DISK_FULL,
        OUT_OF_MEMORY,
        TOO_MANY_CONNECTIONS,
        SERIALIZATION,
        DEADLOCK,
        ADMIN_SHUTDOWN,
        CRASH_SHUTDOWN,
        CANNOT_CONNECT_NOW,
        QUERY_CANCELED,
        IDLE_SESSION_TIMEOUT,
        IDLE_IN_TRANSACTION_TIMEOUT,
    }
)
# Errors after which the session itself is useless: a read-only session stays read-only after
# the primary is writable again (``default_transaction_read_only`` is read at session start),
# so its connection is dropped rather than returned to the pool.
_DROP_SESSION = frozenset({READ_ONLY, ADMIN_SHUTDOWN, CRASH_SHUTDOWN, CANNOT_CONNECT_NOW})


def _psycopg_error(exc: BaseException) -> psycopg.Error | None:
    """The first psycopg error with a SQLSTATE in ``exc``'s chain (what SQLAlchemy wraps, the
    cause, the context), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, psycopg.Error) and current.sqlstate:
            return current
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.orig is not None:
            current = current.orig
            continue
        current = current.__cause__ or current.__context__
    return None


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of ``exc`` or of the psycopg error it wraps, if any."""
    error = _psycopg_error(exc)
    return error.sqlstate if error is not None else None


def is_connection_error(exc: BaseException) -> bool:
    """Errors that reconnecting can heal: the server went away, restarted or refused us."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    state = sqlstate(exc)
    if state is not None and (state.startswith("08") or state in _DROP_SESSION):
        return True
    return isinstance(
        exc,
        sqlalchemy.exc.OperationalError
        | sqlalchemy.exc.InterfaceError
        | psycopg.OperationalError
        | psycopg.InterfaceError
        | ConnectionError,
    )


def is_infrastructure_error(exc: BaseException) -> bool:
    """True when waiting and retrying is the answer: nothing about the message is wrong."""
    if is_connection_error(exc):
        return True
    state = sqlstate(exc)  # class 08 is a connection error, answered above
    return state is not None and state in _TRANSIENT


def drops_session(exc: BaseException) -> bool:
    """True when the connection that met ``exc`` must not be reused."""
    state = sqlstate(exc)
    if state is None:
        return is_connection_error(exc)
    return state.startswith("08") or state in _DROP_SESSION


# SQLSTATE 42P01 (undefined_table) and 42703 (undefined_column): the statement names a table or
# a column the database does not have, i.e. its schema is older than the code (or absent).
SCHEMA_BEHIND = frozenset({"42P01", "42703"})


def missing_schema(exc: BaseException) -> str | None:
    """The server's "relation/column ... does not exist" message when ``exc`` (or what it wraps)
    says the schema is missing or behind, else ``None``: on a database nobody migrated every
    statement fails that way, and the operator needs "run outbox migrate", not a traceback."""
    error = _psycopg_error(exc)
    if error is None or error.sqlstate not in SCHEMA_BEHIND:
        return None
    return error.diag.message_primary or str(error).splitlines()[0]
