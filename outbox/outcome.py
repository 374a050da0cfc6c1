"""What became of one message: Sent, Retry or Dead, and the single place that decides which."""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass

from outbox.backoff import next_delay
from outbox.errors import OutboxError, PermanentSendError

LAST_ERROR_MAX = 2000


@dataclass(frozen=True, slots=True)
class Sent:
    result: str | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float
    error: str


@dataclass(frozen=True, slots=True)
class Dead:
    error: str


Outcome = Sent | Retry | Dead


RESULT_MAX = 2000


def storable(value: object, limit: int = LAST_ERROR_MAX) -> str:
    """``value`` as text PostgreSQL will take, bounded to ``limit`` characters.

    An outcome must never fail to be stored: a failed settle used to roll a whole batch back and
    send it again. A ``text`` column refuses NUL bytes and text that is not valid UTF-8 (lone
    surrogates, say from a decoded SMTP reply), so both are escaped; a non-string (a handler that
    returns a dict) is kept as its ``repr``.
    """
    text = value if isinstance(value, str) else repr(value)
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:limit]


def stored_result(value: object) -> str | None:
    """What a successful handler returned, as the ``result`` column keeps it."""
    return None if value is None else storable(value, RESULT_MAX)


def describe(exc: BaseException) -> str:
    """The last line a traceback would print ("ValueError: bad"), bounded for the column.

    Our own send errors drop the module path: "TransientSendError: SMTP 451 ..." reads better in
    ``outbox dead`` and they are unambiguous.
    """
    if isinstance(exc, OutboxError):
        line = f"{type(exc).__name__}: {exc}"
    else:
        line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    if isinstance(exc, TimeoutError) and not str(exc):
        line = "TimeoutError: the send did not finish within the timeout"
    return storable(line)


def classify(
    exc: BaseException,
    *,
    attempts: int,
    max_attempts: int,
    backoff_base: float,
    backoff_cap: float,
    rng: random.Random,
) -> Retry | Dead:
    """Decide after a failed attempt. ``attempts`` is the count *including* this failure.

    Permanent errors (SMTP 5xx, a mail that cannot be built) are dead at once. Everything else,
    including an unexpected exception from a handler (``SystemExit`` and ``KeyboardInterrupt``
    raised by a handler too: they end that attempt, not the relay), is retried: a bug that is
    fixed and deployed should not have cost the messages that met it. Once ``max_attempts`` is
    reached the message is dead with the last error.
    """
    error = describe(exc)
    if isinstance(exc, PermanentSendError) or attempts >= max_attempts:
        return Dead(error)
    return Retry(next_delay(attempts, base=backoff_base, cap=backoff_cap, rng=rng), error)
