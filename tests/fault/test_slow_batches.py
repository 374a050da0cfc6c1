"""A batch larger than --concurrency sends in waves: regression tests for two bugs of the
lock-holding relay, kept for the new model.

The lock-holding relay (1) rolled a batch back on SIGTERM after mails had gone out, and (2) let
a slow but healthy mail server keep a batch past the idle-in-transaction timeout, so PostgreSQL
killed the session and the batch was re-sent forever. Now no transaction is open while sends
run: (1) a stop lets the running sends finish and settle and releases the rest, and (2) a batch
of many waves simply goes out, however long it takes.
"""

from __future__ import annotations

import time

import pytest

from outbox.relay import RelayConfig
from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    insert_emails,
    scalar,
    sent_message_ids,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault


def test_sigterm_during_a_multi_wave_batch_leaves_nothing_delivered_but_unmarked(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    batch, concurrency, send_timeout, grace = 40, 4, 1.0, 0.5
    insert_emails(db_url, 2 * batch)
    smtp_server.delay = 0.3  # each send well within its timeout; the batch takes ~10 x 0.3 s
    delivered = Delivered(smtp_server)
    relay = relays.start(
        db_url,
        smtp_server.url,
        "--batch-size", str(batch),
        "--concurrency", str(concurrency),
        "--send-timeout", str(send_timeout),
        "--stop-grace", str(grace),
    )  # fmt: skip
    wait_until(
        lambda: delivered.distinct_now() > 0, 30, "the first send", interval=0.01, alive=[relay]
    )
    code, took = relay.terminate_and_wait(30)
    time.sleep(0.5)
    mailed = set(delivered.refresh().counts)
    sent = sent_message_ids(db_url)
    log = relay.log()
    print(
        f"\n[sigterm, multi-wave batch] exit={code} in {took:.2f}s delivered={len(mailed)} "
        f"marked={len(sent)} delivered_unmarked={len(mailed - sent)} "
        f"aborted={'rolling it back' in log}"
    )
    assert code == 0
    assert not mailed - sent, "SIGTERM left delivered mails unmarked: they will be sent again"


def test_slow_smtp_multi_wave_batch_is_settled_not_killed_by_idle_timeout(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    batch, concurrency, send_timeout, delay = 30, 2, 1.0, 0.8
    idle_timeout = RelayConfig(send_timeout=send_timeout).idle_in_transaction_timeout  # 12 s
    waves = -(-batch // concurrency)
    # 15 waves x 0.8 s = 12 s, every send within its 1 s: longer than the session may idle.
    assert waves * delay >= idle_timeout
    insert_emails(db_url, batch)
    smtp_server.delay = delay
    delivered = Delivered(smtp_server)
    relay = relays.start(
        db_url,
        smtp_server.url,
        "--batch-size", str(batch),
        "--concurrency", str(concurrency),
        "--send-timeout", str(send_timeout),
    )  # fmt: skip
    started = time.monotonic()
    deadline = started + waves * delay + 6
    while time.monotonic() < deadline and relay.alive():
        if scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL") == batch:
            break
        time.sleep(0.2)
    marked = int(scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NOT NULL"))
    delivered.refresh()
    log = relay.log()
    print(
        f"\n[idle timeout, multi-wave batch] waves={waves} x {delay}s vs idle timeout "
        f"{idle_timeout:.0f}s: after {time.monotonic() - started:.1f}s marked={marked}/{batch} "
        f"mails={delivered.total} distinct={delivered.distinct} "
        f"session_killed={'IdleInTransactionSessionTimeout' in log}"
    )
    assert marked == batch, "the batch was never settled"
    assert delivered.duplicates == 0
