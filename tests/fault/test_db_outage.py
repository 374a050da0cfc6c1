"""The database goes away under a running relay: terminated sessions, then a real restart."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.settings import normalise_database_url
from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    RelayProcess,
    all_message_ids,
    insert_emails,
    relay_backends,
    scalar,
    scaled,
    terminate_backends,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

RELAY_ARGS = ("--batch-size", "50", "--poll-interval", "1", "--send-timeout", "10")


def sent_count(db_url: str) -> int:
    return int(scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL"))


def finish_and_check(
    db_url: str, n: int, delivered: Delivered, relay: RelayProcess, label: str
) -> None:
    """Wait for the drain to finish with the relay still alive, stop it, check the mailbox."""
    wait_until(
        lambda: delivered.distinct_now() >= n and sent_count(db_url) >= n,
        120,
        f"{label}: all {n} delivered and marked",
        interval=0.1,
        alive=[relay],
    )
    code, took = relay.terminate_and_wait(30)
    assert code == 0, relay.log_tail()
    delivered.refresh()
    assert delivered.distinct == n
    assert set(delivered.counts) == all_message_ids(db_url)
    log = relay.log()
    assert "Traceback" not in log, relay.log_tail(80)
    reconnects = log.count("database unreachable")
    print(
        f"[{label}] mails={delivered.total} distinct={delivered.distinct} "
        f"duplicates={delivered.duplicates} reconnect_log_lines={reconnects} "
        f"sigterm_exit={took:.1f}s"
    )


def terminate_and_recover(
    db_url: str, delivered: Delivered, relay: RelayProcess, progress: int, number: int
) -> float:
    """After ``progress`` more deliveries, terminate every relay session; return the seconds
    until a batch claimed on a new session is settled (more rows marked sent)."""
    target = delivered.distinct_now() + progress
    wait_until(
        lambda: delivered.distinct_now() >= target,
        60,
        f"progress before termination {number}",
        interval=0.02,
        alive=[relay],
    )
    marked = sent_count(db_url)
    old = {pid for pid, _ in relay_backends(db_url)}
    assert terminate_backends(db_url) >= 1
    at = time.monotonic()
    wait_until(
        lambda: (
            sent_count(db_url) > marked
            and any(pid not in old for pid, _ in relay_backends(db_url, "outbox-relay"))
        ),
        60,
        f"recovery after termination {number}",
        interval=0.02,
        alive=[relay],
    )
    recovered = time.monotonic() - at
    wait_until(
        lambda: any(pid not in old for pid, _ in relay_backends(db_url, "outbox-listen")),
        30,
        "a new LISTEN session",
        alive=[relay],
    )
    return recovered


def test_relay_survives_terminated_database_sessions(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    n = scaled(3000)
    terminations = 3
    insert_emails(db_url, n)
    delivered = Delivered(smtp_server)
    relay = relays.start(db_url, smtp_server.url, *RELAY_ARGS)
    wait_until(
        lambda: len(relay_backends(db_url, "outbox-listen")) == 1, 30, "LISTEN", alive=[relay]
    )

    recoveries = [
        terminate_and_recover(db_url, delivered, relay, n // (terminations + 2), i + 1)
        for i in range(terminations)
    ]
    print(
        f"\n[pg_terminate_backend] messages={n} terminations={terminations} "
        f"recovery_s={[round(r, 2) for r in recoveries]}"
    )
    finish_and_check(db_url, n, delivered, relay, "pg_terminate_backend")


# --- a real restart of a server this test owns ------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[tuple[Any, str]]:
    """An embedded PostgreSQL of this test's own (it gets stopped), with a migrated database.

    Its data lives in a directory of its own under /tmp, not in pytest's ``tmp_path``: the server
    runs as another user (pgserver does that under root), and any pytest session started
    meanwhile resets the shared ``/tmp/pytest-of-<user>`` folder to mode 0700.
    """
    import pgserver

    top = Path(tempfile.mkdtemp(prefix="outbox-fault-pg-"))
    data = top / "pg"
    server = pgserver.get_server(str(data), cleanup_mode="stop")
    try:
        admin = server.get_uri()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE fault_restart")
        url = (
            make_url(normalise_database_url(admin))
            .set(database="fault_restart")
            .render_as_string(hide_password=False)
        )
        migrate.upgrade_url(url)
        yield server, url
    finally:
        # The test stopped the server; pgserver may then signal a postmaster that is gone.
        with contextlib.suppress(psutil.NoSuchProcess):
            server.cleanup()
        shutil.rmtree(top, ignore_errors=True)


def stop_server(server: Any) -> None:
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)


def start_server(server: Any) -> None:
    with server._lock:
        server.ensure_postgres_running()


def test_relay_survives_a_database_restart(
    own_server: tuple[Any, str], smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    server, db_url = own_server
    uri_before = server.get_uri()
    n = scaled(3000)
    insert_emails(db_url, n)
    delivered = Delivered(smtp_server)
    relay = relays.start(db_url, smtp_server.url, *RELAY_ARGS)

    wait_until(lambda: delivered.distinct_now() >= n // 5, 60, "the drain to start", alive=[relay])
    stopping = time.monotonic()
    stop_server(server)
    stopped = time.monotonic()
    at_stop = delivered.distinct_now()
    time.sleep(3)
    assert relay.alive(), "the relay must wait for the database, not exit:\n" + relay.log_tail()
    start_server(server)
    restarted = time.monotonic()
    assert server.get_uri() == uri_before, "the URL must survive the restart"
    marked = sent_count(db_url)
    assert marked < n, "the restart should land mid-drain"
    wait_until(
        lambda: sent_count(db_url) > marked,
        60,
        "the relay to settle again",
        interval=0.02,
        alive=[relay],
    )
    recovered = time.monotonic()
    print(
        f"\n[restart] messages={n} delivered_at_stop={at_stop} marked_after_restart={marked} "
        f"stop_took={stopped - stopping:.1f}s outage={restarted - stopped:.1f}s "
        f"recovery_after_restart={recovered - restarted:.2f}s"
    )
    finish_and_check(db_url, n, delivered, relay, "restart")
    assert "database unreachable" in relay.log(), "the outage went unnoticed?"


def test_relay_cut_off_from_its_database_still_stops_on_sigterm(
    own_server: tuple[Any, str], smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    server, db_url = own_server
    relay = relays.start(db_url, smtp_server.url, *RELAY_ARGS)
    wait_until(lambda: relay_backends(db_url, "outbox-listen"), 30, "LISTEN", alive=[relay])
    stop_server(server)
    wait_until(
        lambda: "database unreachable" in relay.log() or "listen connection lost" in relay.log(),
        30,
        "the relay to notice",
        alive=[relay],
    )
    time.sleep(1.0)  # well into its reconnect backoff
    code, took = relay.terminate_and_wait(30)
    print(f"\n[sigterm, database down] exit={code} in {took:.2f}s")
    assert code == 0, relay.log_tail()
    assert took < 10 + 5.0  # the relay's --send-timeout plus --stop-grace (default 5)
    assert "Traceback" not in relay.log(), relay.log_tail()
