"""Several relay processes on one queue: SKIP LOCKED hands every message to exactly one."""

from __future__ import annotations

import re
import time

import pytest

from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    all_message_ids,
    env_int,
    insert_emails,
    scalar,
    scaled,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

_SENT_LINE = re.compile(r"outbox\.relay: sent id=")


def test_four_relays_deliver_every_message_exactly_once(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    n = scaled(20_000, "OUTBOX_FAULT_CONCURRENT_MESSAGES")
    processes = env_int("OUTBOX_FAULT_RELAYS", 4)
    insert_emails(db_url, n)
    started = time.monotonic()
    running = [
        relays.start(db_url, smtp_server.url, "--once", "--batch-size", "100")
        for _ in range(processes)
    ]
    deadline = started + max(120.0, n / 100)
    for relay in running:
        relay.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - started
    for relay in running:
        assert relay.proc.returncode == 0, relay.log_tail()

    delivered = Delivered(smtp_server).refresh()
    per_relay = [len(_SENT_LINE.findall(relay.log())) for relay in running]
    print(
        f"\n[{processes} relays] messages={n} mails={delivered.total} "
        f"distinct={delivered.distinct} duplicates={delivered.duplicates} "
        f"in {elapsed:.1f}s ({n / elapsed:.0f}/s) sent_per_relay={per_relay}"
    )
    assert scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
    assert delivered.total == delivered.distinct == n
    assert set(delivered.counts) == all_message_ids(db_url)
    assert sum(per_relay) == n
    assert all(count > 0 for count in per_relay), "every relay took a share"
