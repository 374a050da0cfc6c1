"""The LISTEN connection is cut: the relay says so, listens again, and wakes promptly again."""

from __future__ import annotations

import time

import pytest

from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    insert_emails,
    relay_backends,
    terminate_backends,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

POLL = 30.0
PROMPT = 5.0  # "promptly": far below the poll interval


def test_lost_listen_connection_is_logged_and_restored(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    delivered = Delivered(smtp_server)
    relay = relays.start(db_url, smtp_server.url, "--poll-interval", str(POLL))
    listen = wait_until(
        lambda: relay_backends(db_url, "outbox-listen"), 30, "LISTEN", alive=[relay]
    )
    ((old_pid, _),) = listen
    time.sleep(0.5)  # past the first (empty) drain: the relay now sleeps until NOTIFY or poll

    def enqueue_and_time(first: int, what: str) -> float:
        before = delivered.distinct_now()
        at = time.monotonic()
        insert_emails(db_url, 1, first=first, notify=True)
        wait_until(
            lambda: delivered.distinct_now() > before, PROMPT, what, interval=0.01, alive=[relay]
        )
        return time.monotonic() - at

    baseline = enqueue_and_time(1, "a NOTIFY wake-up")

    assert terminate_backends(db_url, "outbox-listen") == 1
    cut = time.monotonic()
    # Enqueued while the listener may be down: its NOTIFY can be missed, but the listener wakes
    # the relay when it is back, so this is prompt too.
    during = enqueue_and_time(2, "a message enqueued during the cut")
    wait_until(lambda: "listen connection lost" in relay.log(), 10, "the log line", alive=[relay])
    new = wait_until(
        lambda: [pid for pid, _ in relay_backends(db_url, "outbox-listen") if pid != old_pid],
        10,
        "a new LISTEN session",
        interval=0.02,
        alive=[relay],
    )
    relisten = time.monotonic() - cut
    after = enqueue_and_time(3, "a NOTIFY wake-up on the new session")
    still_relay = relay_backends(db_url, "outbox-listen")
    code, _ = relay.terminate_and_wait(20)
    assert code == 0, relay.log_tail()

    lost_line = next(line for line in relay.log().splitlines() if "listen connection lost" in line)
    print(
        f"\n[listen] baseline_wakeup={baseline:.2f}s during_cut={during:.2f}s "
        f"listening_again_after={relisten:.2f}s (pid {old_pid} -> {new[0]}) "
        f"wakeup_after={after:.2f}s poll_interval={POLL:.0f}s"
    )
    print(f"[listen] log: {lost_line.strip()}")
    assert relisten < 5.0
    assert after < PROMPT and len(still_relay) == 1
    assert delivered.total == delivered.distinct == 3
