"""A handler that runs for a long time holds no transaction open, and one whose relay is
killed mid-handler is taken over by another relay within about a second."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import psycopg
import pytest

from outbox.queries import RELAY_DIED
from outbox.settings import libpq_url
from tests.fault.helpers import (
    RelayFactory,
    insert_rows,
    read_ledger,
    scalar,
    sql,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

HANDLER_S = 20.0
ARGS = ("--import", "tests.fault.relay_handlers", "--poll-interval", "0.5")

# Every session of the relay processes on this database: its state, how old its transaction is,
# and how long it has been in that state. A claim or settle of a few statements is "idle in
# transaction" for a fraction of a millisecond between them; the lock-holding relay was idle in
# its batch transaction for the whole handler.
RELAY_SESSIONS = """
    SELECT application_name, state, coalesce(extract(epoch FROM now() - xact_start), 0),
           extract(epoch FROM now() - state_change)
    FROM pg_stat_activity
    WHERE application_name LIKE 'outbox-relay%%' AND datname = current_database()
"""


def vacuum_verbose(db_url: str, table: str) -> tuple[int, int]:
    """VACUUM (VERBOSE) ``table``: (dead rows removed, dead rows not yet removable)."""
    notices: list[str] = []
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute(f"VACUUM (VERBOSE) {table}")  # a fixed name
    text = "\n".join(notices)
    match = re.search(r"tuples: (\d+) removed, \d+ remain, (\d+) are dead but not yet", text)
    assert match, text
    return int(match.group(1)), int(match.group(2))


def test_a_long_handler_holds_no_transaction_and_vacuum_still_cleans(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    sql(db_url, "CREATE TABLE busy (id int PRIMARY KEY, v int)")
    sql(db_url, "INSERT INTO busy SELECT g, 0 FROM generate_series(1, 20000) AS g")
    (job,) = insert_rows(db_url, "sleep", [f'{{"seconds": {HANDLER_S}}}'])
    relay = relays.start(
        db_url,
        smtp_server.url,
        *ARGS,
        "--send-timeout", str(HANDLER_S + 15),
        OUTBOX_TEST_LEDGER=str(ledger),
    )  # fmt: skip
    wait_until(lambda: read_ledger(ledger), 30, "the handler to start", alive=[relay])
    began = time.monotonic()

    samples: list[tuple[str, str, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.extend(
                (r[0], r[1], float(r[2]), float(r[3] or 0)) for r in sql(db_url, RELAY_SESSIONS)
            )
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        time.sleep(2.0)
        sql(db_url, "UPDATE busy SET v = v + 1")  # 20,000 dead row versions
        removed, kept = vacuum_verbose(db_url, "busy")
        vacuumed_at = time.monotonic() - began
        wait_until(
            lambda: any(e[0] == "done" for e in read_ledger(ledger)),
            HANDLER_S + 10,
            "the handler to finish",
            alive=[relay],
        )
        wait_until(
            lambda: scalar(db_url, "SELECT sent_at FROM outbox WHERE id = %s", (job,)),
            10,
            "the outcome settled",
            alive=[relay],
        )
    finally:
        stop.set()
        sampler.join()
    code, _ = relay.terminate_and_wait(30)

    runs = [e for e in read_ledger(ledger) if e[0] == "start"]
    oldest = max((s[2] for s in samples), default=0.0)
    idle_in_tx = sorted(
        {f"{s[0]} {s[3]:.2f}s" for s in samples if s[1] == "idle in transaction" and s[3] > 0.5}
    )
    attempts = scalar(db_url, "SELECT attempts FROM outbox WHERE id = %s", (job,))
    print(
        f"\n[long handler] {HANDLER_S:.0f}s handler: runs={len(runs)} attempts={attempts} "
        f"samples={len(samples)} oldest_relay_transaction={oldest:.2f}s "
        f"idle_in_transaction={idle_in_tx} vacuum at +{vacuumed_at:.1f}s removed={removed} "
        f"not_yet_removable={kept}"
    )
    assert code == 0, relay.log_tail()
    assert len(runs) == 1 and attempts == 1
    assert samples, "the relay's sessions were never seen"
    assert not idle_in_tx
    assert oldest < 2.0
    assert removed >= 20000 and kept == 0


def test_kill_9_mid_handler_another_relay_takes_the_message_over_within_seconds(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    env = {"OUTBOX_TEST_LEDGER": str(ledger)}
    started = [relays.start(db_url, smtp_server.url, *ARGS, **env) for _ in range(2)]
    for relay in started:
        relay.wait_started()
    (job,) = insert_rows(db_url, "sleep", ['{"seconds": 3}'])
    sql(db_url, "SELECT pg_notify('outbox', '')")
    first = wait_until(lambda: read_ledger(ledger), 30, "the handler to start", alive=started)
    victim = next(r for r in started if r.pid == first[0][2])
    survivor = next(r for r in started if r is not victim)
    victim.kill9()
    killed_at = time.time()

    again = wait_until(
        lambda: [e for e in read_ledger(ledger) if e[0] == "start" and e[2] == survivor.pid],
        30,
        "the other relay to take the message over",
        alive=[survivor],
    )
    taken_over = again[0][3] - killed_at
    wait_until(
        lambda: scalar(db_url, "SELECT sent_at FROM outbox WHERE id = %s", (job,)),
        30,
        "the message delivered by the survivor",
        alive=[survivor],
    )
    attempts, last_error = sql(
        db_url, "SELECT attempts, last_error FROM outbox WHERE id = %s", (job,)
    )[0]
    code, _ = survivor.terminate_and_wait(30)
    print(f"\n[kill -9 mid-handler] taken over after {taken_over:.2f}s (bound 5 s)")
    assert code == 0, survivor.log_tail()
    assert taken_over <= 5.0
    assert attempts == 2 and last_error == RELAY_DIED
    assert "rescued 1 message(s) of 1 dead relay(s)" in survivor.log()
