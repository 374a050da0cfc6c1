"""The database turns read-only for 10 s (a failover lands the relay on a standby): the relay
stays up, spends no attempt, and resumes within about a second of the database being writable.

The failover is played on this test's own database: ``default_transaction_read_only`` is set on
it and every relay session is terminated, so the sessions the relay opens again are read-only
(25006 on every write); then the setting is reset.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from outbox.settings import libpq_url
from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    insert_emails,
    scalar,
    terminate_backends,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

READ_ONLY_S = 10.0


def admin(pg_admin_url: str, statement: str) -> None:
    with psycopg.connect(libpq_url(pg_admin_url), autocommit=True) as conn:
        conn.execute(statement.encode())


def sent(db_url: str) -> int:
    return int(scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL"))


def test_a_read_only_database_spends_no_attempt_and_the_relay_resumes(
    db_url: str, pg_admin_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    n = 1500
    name = make_url(db_url).database
    insert_emails(db_url, n)
    smtp_server.delay = 0.02
    delivered = Delivered(smtp_server)
    relay = relays.start(
        db_url, smtp_server.url, "--concurrency", "4", "--batch-size", "20", "--poll-interval", "1"
    )
    wait_until(lambda: sent(db_url) >= 100, 60, "the drain to start", alive=[relay])

    admin(pg_admin_url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    try:
        terminate_backends(db_url)
        time.sleep(1.0)
        during = sent(db_url)
        time.sleep(READ_ONLY_S - 1.0)
        still = sent(db_url)
        assert relay.alive(), relay.log_tail()
    finally:
        admin(pg_admin_url, f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    writable_at = time.monotonic()
    wait_until(lambda: sent(db_url) > still, 10, "the relay to resume", interval=0.05)
    resumed = time.monotonic() - writable_at
    wait_until(lambda: sent(db_url) == n, 120, "the drain to finish", alive=[relay])
    code, _ = relay.terminate_and_wait(30)

    attempts = scalar(db_url, "SELECT max(attempts) FROM outbox")
    log = relay.log()
    lines = log.count("database unreachable")
    delivered.refresh()
    print(
        f"\n[read-only {READ_ONLY_S:.0f}s] settled_during={still - during} "
        f"resumed_after={resumed:.2f}s max_attempts_spent={attempts} "
        f"log_lines={lines} duplicates={delivered.duplicates}"
    )
    assert code == 0, relay.log_tail()
    assert still == during, "nothing can be settled on a read-only database"
    assert resumed <= 2.0
    assert attempts == 1, "the outage spent no attempt"
    assert delivered.distinct == n and delivered.duplicates == 0
    assert "SQLSTATE 25006" in log
    assert "Traceback" not in log
    assert lines <= 4 * (READ_ONLY_S + 5), "about one line per try and part, not a flood"
