"""The mail server misbehaves: it goes away for a while, or swallows a mail and never answers."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    all_message_ids,
    insert_emails,
    scalar,
    scaled,
    sql,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault


def max_failures_within(window: float, *, base: float, cap: float) -> int:
    """The most failed attempts one message can make in ``window`` seconds of outage.

    The relay's delays ("equal jitter", outbox.backoff) are at least half the exponential step,
    so k failures take at least the sum of the first k-1 floors.
    """
    failures, elapsed = 1, 0.0
    while True:
        step = min(cap, base * 2.0 ** (failures - 1))
        if elapsed + step / 2 > window:
            return failures
        elapsed += step / 2
        failures += 1


def test_smtp_outage_retries_with_backoff_then_delivers_everything(
    db_url: str, relays: RelayFactory
) -> None:
    n = scaled(600)
    outage = 5.0
    base, cap = 0.5, 2.0
    insert_emails(db_url, n)
    first = CaptureServer(limit=0).start()
    second: CaptureServer | None = None
    try:
        first.delay = 0.01  # keep the drain going while the server is pulled away
        delivered = Delivered(first)
        relay = relays.start(
            db_url,
            first.url,
            "--batch-size", "50",
            "--poll-interval", "0.2",  # a broken backoff would show as a hot loop at 5/s
            "--send-timeout", "5",
            "--backoff-base", str(base),
            "--backoff-cap", str(cap),
        )  # fmt: skip
        wait_until(
            lambda: delivered.distinct_now() >= n // 4, 60, "a quarter delivered", alive=[relay]
        )
        first.stop()
        down = time.monotonic()
        before = delivered.distinct_now()
        time.sleep(outage)
        failed_during = int(
            scalar(db_url, "SELECT sum(attempts) FROM outbox WHERE sent_at IS NULL")
        )
        second = CaptureServer(port=first.port, limit=0).start()
        up = time.monotonic()
        delivered.add_server(second)
        wait_until(
            lambda: (
                delivered.distinct_now() >= n
                and scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
            ),
            60,
            f"all {n} delivered after the outage",
            interval=0.05,
            alive=[relay],
        )
        recovered = time.monotonic()
        code, _ = relay.terminate_and_wait(20)
        assert code == 0, relay.log_tail()
        data_attempts = first.data_attempts + second.data_attempts
    finally:
        first.stop()  # stop() is idempotent
        if second is not None:
            second.stop()

    delivered.refresh()
    assert delivered.distinct == n
    assert set(delivered.counts) == all_message_ids(db_url)
    attempts = Counter(r[0] for r in sql(db_url, "SELECT attempts FROM outbox"))
    failures = sum(a * c for a, c in attempts.items()) - n
    errors = Counter(
        (r[0] or "")[:45] for r in sql(db_url, "SELECT last_error FROM outbox WHERE attempts > 1")
    )
    bound = max_failures_within(up - down + 0.5, base=base, cap=cap) + 1
    print(
        f"\n[smtp outage] messages={n} outage={up - down:.1f}s delivered_before={before} "
        f"failed_attempts={failures} (during outage {failed_during}) "
        f"attempts_histogram={dict(sorted(attempts.items()))} max_attempts={max(attempts)} "
        f"bound={bound} back_to_all_delivered={recovered - up:.1f}s "
        f"duplicates={delivered.duplicates} smtp_data_commands={data_attempts}"
    )
    print(f"[smtp outage] last errors of retried rows: {dict(errors)}")
    assert failures > 0, "the outage was not noticed"
    assert max(attempts) <= bound, "retries came faster than the backoff allows"
    # Without backoff a 0.2 s poll would make ~25 tries per message in 5 s.
    assert failures <= (n - before) * (bound - 1)


def test_stalled_send_times_out_is_retried_and_others_keep_flowing(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    n = scaled(300)
    stalled_to = "stall@example.test"
    insert_emails(db_url, n // 2)
    (stalled_id,) = insert_emails(db_url, 1, first=n // 2 + 1, to=stalled_to)
    insert_emails(db_url, n - n // 2 - 1, first=n // 2 + 2)
    stalled_uuid = str(scalar(db_url, "SELECT message_id FROM outbox WHERE id = %s", (stalled_id,)))
    smtp_server.stall.add(stalled_to)
    delivered = Delivered(smtp_server)

    def stalled_row() -> tuple[int, str | None, object]:
        row = sql(
            db_url, "SELECT attempts, last_error, sent_at FROM outbox WHERE id = %s", (stalled_id,)
        )[0]
        return row[0], row[1], row[2]

    started = time.monotonic()
    relay = relays.start(
        db_url,
        smtp_server.url,
        "--batch-size", "20",
        "--poll-interval", "0.2",
        "--send-timeout", "2",
        "--backoff-base", "0.5",
        "--backoff-cap", "1",
    )  # fmt: skip
    wait_until(lambda: delivered.distinct_now() >= n - 1, 60, "every other message", alive=[relay])
    others_done = time.monotonic() - started
    attempts_then, _, _ = stalled_row()
    wait_until(lambda: stalled_row()[0] >= 2, 30, "the stalled message retried", alive=[relay])
    attempts, last_error, sent_at = stalled_row()
    retried_after = time.monotonic() - started
    assert sent_at is None and stalled_uuid not in delivered.counts
    assert last_error is not None
    assert "timed out" in last_error and "Ambiguous" in last_error, last_error

    smtp_server.stall.clear()  # the server heals: the next retry goes through
    wait_until(
        lambda: stalled_uuid in delivered.refresh().counts, 30, "the stalled one", alive=[relay]
    )
    healed = time.monotonic() - started
    wait_until(
        lambda: stalled_row()[2] is not None, 10, "the stalled one marked sent", alive=[relay]
    )
    code, _ = relay.terminate_and_wait(20)
    assert code == 0, relay.log_tail()

    delivered.refresh()
    print(
        f"\n[stall] messages={n} others_delivered_in={others_done:.1f}s "
        f"stalled_attempts_then={attempts_then} attempts={attempts} at {retried_after:.1f}s "
        f"delivered_after_unstall_at={healed:.1f}s final_attempts={stalled_row()[0]} "
        f"duplicates={delivered.duplicates}"
    )
    print(f"[stall] last_error={last_error!r}")
    assert delivered.distinct == n
    assert delivered.duplicates == 0
    assert delivered.counts[stalled_uuid] == 1
