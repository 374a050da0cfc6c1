"""A handler that kills the relay process, under a supervisor that restarts it (systemd's
``Restart=always``): attempts are counted at claim, so the crash loop ends."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from outbox.queries import RELAY_DIED
from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    RelayProcess,
    all_message_ids,
    insert_emails,
    insert_rows,
    read_ledger,
    scaled,
    sql,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

CONCURRENCY = 8
MAX_ATTEMPTS = 4
BOUND = 2 * 2 * CONCURRENCY


def test_a_message_that_kills_the_relay_ends_dead_and_its_batch_mates_are_not_resent(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory, tmp_path: Path
) -> None:
    n = scaled(300)
    insert_emails(db_url, n // 2)
    (crash_id,) = insert_rows(db_url, "crash", ['{"n": 1}'])
    insert_emails(db_url, n - n // 2, first=n // 2 + 1)
    emails = all_message_ids(db_url) - {
        str(sql(db_url, "SELECT message_id FROM outbox WHERE id = %s", (crash_id,))[0][0])
    }
    smtp_server.delay = 0.02  # batch-mates are in flight when the crash comes
    ledger = tmp_path / "ledger"
    delivered = Delivered(smtp_server)
    args = (
        "--import", "tests.fault.relay_handlers",
        "--max-attempts", str(MAX_ATTEMPTS),
        "--concurrency", str(CONCURRENCY),
        "--batch-size", "20",
        "--poll-interval", "0.2",
    )  # fmt: skip

    def crash_row() -> tuple[int, str | None, object]:
        row = sql(
            db_url, "SELECT attempts, last_error, dead_at FROM outbox WHERE id = %s", (crash_id,)
        )[0]
        return row[0], row[1], row[2]

    started = time.monotonic()
    relay: RelayProcess | None = None
    exits: list[int] = []
    while time.monotonic() - started < 120:
        if crash_row()[2] is not None and delivered.distinct_now() >= len(emails):
            break
        if relay is None or not relay.alive():
            if relay is not None:
                exits.append(relay.proc.returncode)
            relay = relays.start(
                db_url, smtp_server.url, *args, OUTBOX_TEST_LEDGER=str(ledger)
            )  # like Restart=always
        time.sleep(0.05)
    else:
        pytest.fail(f"no end to the crash loop after 120 s: exits={exits} row={crash_row()}")
    elapsed = time.monotonic() - started
    assert relay is not None
    wait_until(lambda: relay.alive(), 1, "the last relay alive")
    time.sleep(1.0)  # nothing more happens to the dead message
    code, _ = relay.terminate_and_wait(30)

    attempts, last_error, dead_at = crash_row()
    starts = [e for e in read_ledger(ledger) if e[0] == "start" and e[1] == crash_id]
    delivered.refresh()
    print(
        f"\n[crash loop] emails={len(emails)} crash attempts={attempts} last_error={last_error!r} "
        f"relay exits={exits} handler runs={len(starts)} mails={delivered.total} "
        f"duplicates={delivered.duplicates} (bound {BOUND}) in {elapsed:.1f}s"
    )
    assert code == 0, relay.log_tail()
    assert dead_at is not None and attempts == MAX_ATTEMPTS
    assert last_error == RELAY_DIED
    assert exits == [1] * MAX_ATTEMPTS, "one crash per attempt, then no more"
    assert len(starts) == MAX_ATTEMPTS
    alone = sum(
        r.log().count(f"running abandoned message id={crash_id} alone") for r in relays.started
    )
    assert alone == MAX_ATTEMPTS - 2, "from the second rescue on, it runs alone"
    assert set(delivered.counts) == emails
    # Only the first two crashes, with the message in a normal claim, can cost its batch-mates a
    # second send: each at most the relay's handlers running (concurrency) plus the outcomes the
    # completer had not yet written (a few milliseconds' worth). From the second rescue on it runs
    # alone and its crashes cost nothing.
    assert delivered.duplicates <= BOUND
    assert int(sql(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")[0][0]) == 1
