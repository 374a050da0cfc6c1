"""Log set-up for the CLI: readable lines for people, JSON lines for log pipelines."""

from __future__ import annotations

import json
import logging
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


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = text_line(
            text_stamp(record.created), record.levelname, record.name, record.getMessage()
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json_line(
            json_stamp(record.created), record.levelname, record.name, record.getMessage(), fields
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
