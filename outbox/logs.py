"""Log set-up for the CLI: readable lines for people, JSON lines for log pipelines.

One event is one line. Database drivers put newlines in their errors (libpq's "Is the server
running ...?" hint, SQLAlchemy's "Background on this error at ..." link), so a database outage
used to print each reconnect attempt over three or four lines, which breaks grep, journald and
log shippers that split on newlines. The formatters fold such messages onto one line, and print a
connection error's one-line description instead of its traceback: an outage is expected
operation, retried by the relay, not a bug to debug. Other exceptions (a handler's bug) keep
their traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else was passed in ``extra=`` and is worth printing.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def text_stamp(created: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(created))


def json_stamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


def text_line(stamp: str, level: str, name: str, message: str) -> str:
    """``12:00:01 INFO    outbox.relay: message``: the one shape of a text log line."""
    return f"{stamp} {level.upper():<7} {name}: {message}"


def json_line(stamp: str, level: str, name: str, message: str, fields: dict[str, object]) -> str:
    """The one shape of a JSON log line; ``fields`` that are ``None`` are left out."""
    entry: dict[str, object] = {"ts": stamp, "level": level.lower(), "logger": name}
    entry["message"] = message
    entry.update((key, value) for key, value in fields.items() if value is not None)
    return json.dumps(entry, default=str)


# SQLAlchemy appends this to every error it wraps; a link is noise in a log line.
_BACKGROUND = re.compile(r"\s*\(Background on this error at: [^)]*\)")


def fold(text: str) -> str:
    """``text`` on one line: its lines stripped and joined by spaces, SQLAlchemy's link left out."""
    if "\n" not in text:
        return text
    text = _BACKGROUND.sub("", text)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _message(record: logging.LogRecord) -> str:
    return fold(record.getMessage())


def _connection_error(record: logging.LogRecord) -> BaseException | None:
    """The record's exception when reconnecting can heal it (the database went away)."""
    if not record.exc_info or record.exc_info[1] is None:
        return None
    from outbox.dberrors import is_connection_error  # not at import time: it imports drivers

    exc = record.exc_info[1]
    return exc if is_connection_error(exc) else None


def describe_briefly(exc: BaseException) -> str:
    """``OperationalError: connection failed: ...``: the exception's type and message, folded."""
    return fold(f"{type(exc).__name__}: {exc}")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = text_line(
            text_stamp(record.created), record.levelname, record.name, _message(record)
        )
        connection_error = _connection_error(record)
        if connection_error is not None:
            line += f": {describe_briefly(connection_error)}"
        elif record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        connection_error = _connection_error(record)
        if connection_error is not None:
            fields["exc"] = describe_briefly(connection_error)
        elif record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json_line(
            json_stamp(record.created), record.levelname, record.name, _message(record), fields
        )


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
