"""SIGTERM in the middle of a batch: exit 0 within the bound, nothing left half done."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    env_int,
    insert_emails,
    scalar,
    scaled,
    sent_message_ids,
    sql,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

SEND_TIMEOUT = 5.0
STOP_GRACE = 2.0
SLACK = 3.0


def test_sigterm_mid_batch_exits_zero_and_leaves_no_half_state(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    n = scaled(1000)
    rounds = env_int("OUTBOX_FAULT_SIGTERM_ROUNDS", 3)
    seed = env_int("OUTBOX_FAULT_SEED", int.from_bytes(os.urandom(4), "big"))
    rng = random.Random(seed)
    insert_emails(db_url, n)
    smtp_server.delay = 0.3  # a batch of 50 at concurrency 32 takes about 0.6 s
    delivered = Delivered(smtp_server)
    bound = SEND_TIMEOUT + STOP_GRACE
    print(f"\n[sigterm] seed={seed} messages={n} bound={bound:.0f}s+{SLACK:.0f}s")

    for r in range(rounds):
        relay = relays.start(
            db_url,
            smtp_server.url,
            "--batch-size", "50",
            "--send-timeout", str(SEND_TIMEOUT),
            "--stop-grace", str(STOP_GRACE),
            "--poll-interval", "1",
        )  # fmt: skip
        before = delivered.distinct_now()
        wait_until(
            lambda: delivered.distinct_now() > before,  # noqa: B023 - called at once
            30,
            "a send",
            interval=0.01,
            alive=[relay],
        )
        time.sleep(rng.uniform(0, 0.4))
        in_transaction = sql(
            db_url,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-relay' "
            "AND state = 'idle in transaction' AND datname = current_database()",
        )[0][0]
        at_term = delivered.distinct_now()
        code, took = relay.terminate_and_wait(SEND_TIMEOUT + STOP_GRACE + 30)
        after = delivered.distinct_now()
        assert code == 0, relay.log_tail()
        assert took < SEND_TIMEOUT + STOP_GRACE + SLACK, f"took {took:.1f}s to exit"
        assert "relay stopped" in relay.log()

        # The mailbox against the table: marked sent <=> delivered. Anything delivered but not
        # marked would be sent again later; anything marked but not delivered would be lost.
        sent = sent_message_ids(db_url)
        mailed = set(delivered.refresh().counts)
        unmarked, undelivered = mailed - sent, sent - mailed
        states = sql(
            db_url,
            "SELECT count(*) FILTER (WHERE sent_at IS NOT NULL AND attempts = 1), "
            "count(*) FILTER (WHERE sent_at IS NULL AND dead_at IS NULL AND attempts = 0 "
            "AND last_error IS NULL AND available_at <= now()), count(*) FROM outbox",
        )[0]
        print(
            f"[sigterm] round {r + 1}: exit={code} in {took:.2f}s batch_open={in_transaction} "
            f"delivered_at_term={at_term} finished_after_term={after - at_term} "
            f"marked={len(sent)} delivered_unmarked={len(unmarked)} "
            f"marked_undelivered={len(undelivered)} still_due={states[1]}"
        )
        assert not unmarked and not undelivered
        assert after - at_term <= 50, "after SIGTERM only the batch in flight may finish"
        assert states[0] + states[1] == states[2] == n, f"a row in a half state: {states}"
        assert delivered.duplicates == 0
        if len(sent) == n:
            break


def test_sigterm_while_still_starting_exits_zero_and_claims_nothing(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory, tmp_path: Path
) -> None:
    """A supervisor may stop a relay that is still importing or connecting (a rolling deploy):
    that is a clean stop too, not a death by signal, and no message is touched."""
    insert_emails(db_url, 20)
    started_marker = tmp_path / "importing"
    (tmp_path / "slow_handlers.py").write_text(
        f"import pathlib, time\npathlib.Path({str(started_marker)!r}).touch()\ntime.sleep(3)\n"
    )
    relay = relays.start(
        db_url, smtp_server.url, "--import", "slow_handlers", PYTHONPATH=str(tmp_path)
    )
    wait_until(started_marker.exists, 30, "the relay to import its handlers", alive=[relay])
    assert "relay running" not in relay.log()
    relay.signal(signal.SIGTERM)
    code = relay.proc.wait(timeout=30)

    assert code == 0, relay.log_tail()
    assert "relay stopped" in relay.log()
    assert smtp_server.mails == [] and smtp_server.data_attempts == 0
    untouched = "SELECT count(*) FROM outbox WHERE attempts = 0 AND sent_at IS NULL"
    assert scalar(db_url, untouched) == 20
