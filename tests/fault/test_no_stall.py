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
