"""One hung send occupies one worker, not the relay: the others keep flowing.

With the lock-holding relay a batch was a barrier: the next claim waited for the batch's
slowest send, so one hung recipient held up to a batch of mail for a whole send timeout.
"""

from __future__ import annotations

import time

import pytest

from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    insert_emails,
    scalar,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault


def test_one_hung_send_in_400_does_not_hold_up_the_other_399(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    n = 400
    hung = "user200@example.test"
    smtp_server.stall = {hung}
    insert_emails(db_url, n)
    delivered = Delivered(smtp_server)
    relay = relays.start(
        db_url, smtp_server.url, "--concurrency", "16", "--send-timeout", "30"
    )  # default batch size
    wait_until(lambda: delivered.distinct_now() > 0, 30, "the first mail", interval=0.01)
    first = time.monotonic()
    wait_until(
        lambda: delivered.distinct_now() >= n - 1,
        30,
        "the other 399 mails",
        interval=0.01,
        alive=[relay],
    )
    took = time.monotonic() - first
    hung_row = scalar(
        db_url, "SELECT sent_at IS NULL FROM outbox WHERE payload->>'to' = %s", (hung,)
    )
    print(f"\n[no stall] {n - 1} of {n} accepted {took:.2f}s after the first, one still hanging")
    assert hung_row is True, "the hung send is still hanging"
    assert took <= 3.0


def test_more_hung_sends_than_workers_let_the_rest_flow_within_the_slow_cap(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    """6 hung recipients against concurrency 4: with a hard cap of 4 sends, the first 4 would
    hold every worker until the send timeout. A send slower than --slow-after stops counting:
    4 are parked (--max-slow 4), the other 2 keep their workers, and the 2 workers left deliver
    the other 200 while all 6 still hang. The SMTP server sees 4 + 4 DATA at once, never more
    (the relay's SMTP pool is that size too). SIGTERM then still exits within the stop bound
    (--send-timeout + --stop-grace: parking starts no send after the stop), the hung sends
    settled as failures."""
    hung = 6
    n = hung + 200
    smtp_server.stall = {f"user{i}@example.test" for i in range(1, hung + 1)}  # claimed first
    smtp_server.delay = 0.02  # the others take a while too, so the 2 free workers overlap
    insert_emails(db_url, n)
    delivered = Delivered(smtp_server)
    relay = relays.start(
        db_url,
        smtp_server.url,
        *("--concurrency", "4", "--max-slow", "4", "--slow-after", "0.2"),
        *("--send-timeout", "15", "--stop-grace", "5"),
    )
    sent = "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL"
    wait_until(
        lambda: scalar(db_url, sent) >= n - hung,
        12,  # inside the send timeout: no hung send was cut off to make room
        "the 200 mails behind the hung ones, sent",
        interval=0.05,
        alive=[relay],
    )
    unsent = scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    print(
        f"\n[slow cap] {n - hung} delivered beside {hung} hung sends; "
        f"{smtp_server.in_data} DATA in flight now, {smtp_server.most_in_data} at most"
    )
    assert unsent == hung
    assert delivered.distinct_now() == n - hung
    assert smtp_server.in_data == hung  # every hung send is still hanging
    assert smtp_server.most_in_data == 8  # 4 workers + 4 parked, and never more
    assert "plus 4 sends slower than 0.2s" in relay.log()

    code, took = relay.terminate_and_wait(timeout=60)
    print(f"[slow cap] SIGTERM: exit {code} after {took:.1f}s (bound 20s)")
    assert code == 0
    assert took <= 15 + 5
    failed = "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND last_error IS NOT NULL"
    assert scalar(db_url, failed) == hung
