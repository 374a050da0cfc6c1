"""A relay frozen (SIGSTOP) while it holds a batch: PostgreSQL ends its idle transaction and
another relay delivers the batch, within the idle_in_transaction timeout."""

from __future__ import annotations

import os
import signal
import time

import pytest

from outbox.relay import RelayConfig
from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    all_message_ids,
    insert_emails,
    scaled,
    sql,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

SEND_TIMEOUT = 1.0
ARGS = ("--send-timeout", str(SEND_TIMEOUT), "--batch-size", "20", "--poll-interval", "0.5")

# The rows some other transaction holds locked (SKIP LOCKED skips exactly those).
LOCKED = """
    SELECT id FROM outbox WHERE sent_at IS NULL AND dead_at IS NULL
    EXCEPT
    SELECT id FROM (SELECT id FROM outbox WHERE sent_at IS NULL AND dead_at IS NULL
                    FOR UPDATE SKIP LOCKED) AS free
"""
IDLE_IN_BATCH = """
    SELECT pid, extract(epoch FROM now() - state_change) FROM pg_stat_activity
    WHERE application_name = 'outbox-relay' AND state = 'idle in transaction'
      AND datname = current_database()
"""


def test_frozen_relay_batch_is_released_by_idle_timeout(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    n = scaled(400)
    bound = RelayConfig(send_timeout=SEND_TIMEOUT).idle_in_transaction_timeout  # 11 s
    insert_emails(db_url, n)
    smtp_server.delay = 0.3  # each batch spends ~0.3 s idle in its transaction
    delivered = Delivered(smtp_server)
    frozen = relays.start(db_url, smtp_server.url, *ARGS)
    wait_until(lambda: delivered.distinct_now() > 0, 30, "the first send", alive=[frozen])

    # Freeze it at a moment it holds a batch (idle in transaction); else thaw and try again.
    for _ in range(50):
        os.kill(frozen.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        idle = sql(db_url, IDLE_IN_BATCH)
        if idle:
            break
        os.kill(frozen.pid, signal.SIGCONT)
        time.sleep(0.05)
    else:
        pytest.fail("never caught the relay inside a batch")
    (backend, idle_for), *_ = idle
    locked = {r[0] for r in sql(db_url, LOCKED)}
    assert 0 < len(locked) <= 20
    locked_uuids = {
        str(r[0]) for r in sql(db_url, "SELECT message_id FROM outbox WHERE id = ANY(%s)",
                               (list(locked),))
    }  # fmt: skip
    expected_release = float(bound) - float(idle_for)  # seconds from the freeze

    smtp_server.delay = 0.02  # the frozen relay is stuck anyway; let the second one drain fast
    second = relays.start(db_url, smtp_server.url, *ARGS)
    wait_until(
        lambda: not sql(db_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)),
        bound + 10,
        "PostgreSQL to end the frozen relay's session",
        interval=0.05,
        alive=[second],
    )
    released = time.monotonic() - frozen_at
    others_done = sql(
        db_url,
        "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND NOT id = ANY(%s)",
        (list(locked),),
    )[0][0]
    wait_until(
        lambda: sql(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")[0][0] == 0,
        30,
        "the second relay to deliver the released batch",
        interval=0.05,
        alive=[second],
    )
    taken_over = time.monotonic() - frozen_at
    delivered.refresh()
    assert locked_uuids <= set(delivered.counts)
    assert delivered.distinct == n and set(delivered.counts) == all_message_ids(db_url)
    duplicates = delivered.duplicates

    frozen.kill9()
    code, _ = second.terminate_and_wait(20)
    assert code == 0, second.log_tail()
    print(
        f"\n[frozen] messages={n} locked_batch={len(locked)} idle_timeout={bound:.0f}s "
        f"idle_before_freeze={float(idle_for):.2f}s session_ended_after={released:.1f}s "
        f"(expected {expected_release:.1f}s) batch_delivered_by_second_after={taken_over:.1f}s "
        f"unlocked_left_when_released={others_done} duplicates={duplicates}"
    )
    assert expected_release - 1.0 <= released <= expected_release + 3.0
    assert taken_over <= bound + 4.0
    assert others_done == 0, "the other messages flowed while the batch was held"
    assert duplicates <= len(locked), "only the frozen batch may be sent twice"
