"""Shared machinery of the fault tests: relay processes, SQL, mail counting, bounded waits.

Sizes scale with ``OUTBOX_FAULT_SCALE`` (a multiplier, default 1) so the suite can be run bigger
than its default of a few minutes on a 2-core machine; ``OUTBOX_FAULT_SEED`` fixes the random
kill moments (the seed used is printed either way).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from outbox.settings import libpq_url
from tests.acceptance.cli_helpers import OUTBOX, cli_env
from web.capture import CaptureServer

ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("OUTBOX_FAULT_SCALE", "1"))


def scaled(default: int, env: str | None = None, *, minimum: int = 1) -> int:
    """``default`` (or ``$env`` when set) times OUTBOX_FAULT_SCALE."""
    base = int(os.environ[env]) if env and env in os.environ else default
    return max(minimum, int(base * SCALE))


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# --- waiting ----------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    alive: Iterable[RelayProcess] = (),
) -> Any:
    """Poll ``predicate`` until it is truthy (and return it); fail after ``timeout`` seconds.

    Fails at once, with its log, if one of the ``alive`` relays exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for relay in alive:
            if relay.proc.poll() is not None:
                raise AssertionError(
                    f"relay exited with {relay.proc.returncode} while waiting for {what}:\n"
                    + relay.log_tail()
                )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- relay processes --------------------------------------------------------------------------


class RelayProcess:
    """One ``outbox relay`` process; its output goes to a file (a full pipe would block it)."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        db_url: str,
        smtp_url: str,
        log_path: Path,
        prefix: Sequence[str] = (),
        **env: str,
    ) -> None:
        """``prefix``: a command that runs the relay (``ip netns exec NAME``); it must exec it,
        so that the process's pid is the relay's."""
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [*prefix, OUTBOX, "relay", *self.args],
            env=cli_env(DATABASE_URL=db_url, SMTP_URL=smtp_url, **env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill9(self) -> None:
        """SIGKILL and reap (works on a stopped process too)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def wait_started(self, timeout: float = 30) -> None:
        """Wait until the relay says it is running.

        Before our code runs the interpreter is still loading, and a signal has its default
        effect; a test of the graceful stop must not race that. (A stop while our code is still
        starting is graceful too, and has a test of its own in test_shutdown.py.)
        """
        wait_until(lambda: "relay running" in self.log(), timeout, "relay running", alive=[self])

    def terminate_and_wait(self, timeout: float) -> tuple[int, float]:
        """SIGTERM once the relay has started; return (exit code, seconds it took to exit)."""
        self.wait_started()
        started = time.monotonic()
        self.signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a frozen one cannot die gracefully
            except ProcessLookupError:
                pass
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not hang
                pass
        self._log.close()


class RelayFactory:
    """Starts relays for one test and kills whatever is still running at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[RelayProcess] = []

    def start(
        self, db_url: str, smtp_url: str, *args: str, prefix: Sequence[str] = (), **env: str
    ) -> RelayProcess:
        log = self.tmp_path / f"relay-{len(self.started)}.log"
        relay = RelayProcess(
            args, db_url=db_url, smtp_url=smtp_url, log_path=log, prefix=prefix, **env
        )
        self.started.append(relay)
        return relay

    def close_all(self) -> None:
        for relay in self.started:
            relay.close()


# --- database ---------------------------------------------------------------------------------


def sql(db_url: str, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[Any]:
    """Run one statement in its own autocommit connection; return the rows (if any)."""
    with psycopg.connect(libpq_url(db_url), autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def scalar(db_url: str, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
    rows = sql(db_url, query, params)
    return rows[0][0] if rows else None


def insert_emails(
    db_url: str, count: int, *, first: int = 1, to: str | None = None, notify: bool = False
) -> list[int]:
    """``count`` email rows (column defaults for everything else); returns their ids."""
    with psycopg.connect(libpq_url(db_url)) as conn:
        rows = conn.execute(
            "INSERT INTO outbox (topic, payload) SELECT 'email', jsonb_build_object("
            "'to', coalesce(%s, 'user' || g || '@example.test'), 'subject', 'S' || g, "
            "'text', 'T' || g) FROM generate_series(%s::int, %s::int) AS g RETURNING id",
            (to, first, first + count - 1),
        ).fetchall()
        if notify:
            conn.execute("SELECT pg_notify('outbox', '')")
    return [r[0] for r in rows]


def all_message_ids(db_url: str) -> set[str]:
    return {str(r[0]) for r in sql(db_url, "SELECT message_id FROM outbox")}


def sent_message_ids(db_url: str) -> set[str]:
    return {
        str(r[0]) for r in sql(db_url, "SELECT message_id FROM outbox WHERE sent_at IS NOT NULL")
    }


def relay_backends(db_url: str, app: str = "outbox-%") -> list[tuple[int, str]]:
    """(pid, application_name) of the relay sessions on this test's database."""
    return [
        (r[0], r[1])
        for r in sql(
            db_url,
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE application_name LIKE %s AND datname = current_database()",
            (app,),
        )
    ]


def terminate_backends(db_url: str, app: str = "outbox-%") -> int:
    rows = sql(
        db_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name LIKE %s AND datname = current_database()",
        (app,),
    )
    return sum(1 for r in rows if r[0])


# --- what the SMTP server received ------------------------------------------------------------

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*<([0-9a-fA-F-]{36})@", re.MULTILINE | re.IGNORECASE)


class Delivered:
    """Message-IDs the capture server(s) accepted, in arrival order, parsed incrementally.

    Reads the raw header with a regex rather than parsing each MIME message: the capture server
    shares this process's GIL, and a full parse of 20,000 mails would slow it down.
    """

    def __init__(self, *servers: CaptureServer) -> None:
        self.servers = list(servers)
        self._seen = [0] * len(self.servers)
        self.ids: list[str] = []  # one entry per accepted mail, duplicates included
        self.counts: Counter[str] = Counter()

    def add_server(self, server: CaptureServer) -> None:
        self.servers.append(server)
        self._seen.append(0)

    def refresh(self) -> Delivered:
        for i, server in enumerate(self.servers):
            mails = server.mails
            for mail in mails[self._seen[i] :]:
                match = _MESSAGE_ID.search(mail.raw)
                assert match, f"a mail without a Message-ID: {mail.raw[:300]!r}"
                message_id = match.group(1).decode().lower()
                self.ids.append(message_id)
                self.counts[message_id] += 1
            self._seen[i] = len(mails)
        return self

    @property
    def total(self) -> int:
        return len(self.ids)

    @property
    def distinct(self) -> int:
        return len(self.counts)

    @property
    def duplicates(self) -> int:
        return self.total - self.distinct

    def distinct_now(self) -> int:
        return self.refresh().distinct


def check_message_id_header(server: CaptureServer, sample: int = 3) -> None:
    """The regex above reads the same Message-ID as the email parser (``CapturedMail``)."""
    for mail in server.mails[:sample]:
        match = _MESSAGE_ID.search(mail.raw)
        assert match and mail.message_id.startswith(f"<{match.group(1).decode()}@")


# --- the ledger of tests/fault/relay_handlers.py ----------------------------------------------


def read_ledger(path: Path) -> list[tuple[str, int, int, float]]:
    """(event, outbox id, pid, unix time) per line the in-process handlers wrote."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        event, outbox_id, pid, at = line.split()
        out.append((event, int(outbox_id), int(pid), float(at)))
    return out


def insert_rows(db_url: str, topic: str, payloads: Sequence[str]) -> list[int]:
    """One row per JSON payload, in order; returns their ids."""
    with psycopg.connect(libpq_url(db_url)) as conn:
        return [
            conn.execute(
                "INSERT INTO outbox (topic, payload) VALUES (%s, %s::jsonb) RETURNING id",
                (topic, payload),
            ).fetchone()[0]  # type: ignore[index]
            for payload in payloads
        ]
