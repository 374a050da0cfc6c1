"""kill -9 a relay again and again while it drains: nothing is lost, duplicates stay bounded."""

from __future__ import annotations

import os
import random
import time

import pytest

from tests.fault.helpers import (
    Delivered,
    RelayFactory,
    all_message_ids,
    check_message_id_header,
    env_int,
    insert_emails,
    scalar,
    scaled,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

BATCH = 50


def test_kill_9_at_random_moments_loses_nothing(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    n = scaled(5000, "OUTBOX_FAULT_KILL_MESSAGES")
    kills = env_int("OUTBOX_FAULT_KILLS", 20)
    seed = env_int("OUTBOX_FAULT_SEED", int.from_bytes(os.urandom(4), "big"))
    rng = random.Random(seed)
    insert_emails(db_url, n)
    delivered = Delivered(smtp_server)
    args = ("--batch-size", str(BATCH), "--poll-interval", "0.5", "--send-timeout", "10")
    started = time.monotonic()

    boundaries: list[int] = []  # mails received when each killed relay was gone
    moments: list[str] = []
    for k in range(kills):
        relay = relays.start(db_url, smtp_server.url, *args)
        before = delivered.distinct_now()
        remaining = n - before
        if rng.random() < 0.25 or remaining < 2:
            # Anywhere from start-up to the first batches: connecting, claiming, sending.
            pause = rng.uniform(0.3, 1.5)
            time.sleep(pause)
            moment = f"t+{pause:.2f}s"
        else:
            # Mid-drain: after a random amount of progress, leaving work for the later kills.
            step = rng.randint(1, max(1, remaining // (kills - k + 2)))
            wait_until(
                lambda: delivered.distinct_now() >= before + step,  # noqa: B023 - called at once
                60,
                f"kill {k + 1}: {step} more deliveries",
                interval=0.01,
                alive=[relay],
            )
            time.sleep(rng.uniform(0, 0.05))
            moment = f"+{step} mails"
        relay.kill9()
        time.sleep(0.05)  # let the server finish reading whatever was already on the wire
        boundaries.append(delivered.refresh().total)
        moments.append(moment)

    final = relays.start(db_url, smtp_server.url, *args)
    wait_until(lambda: delivered.distinct_now() >= n, 240, f"all {n} delivered", alive=[final])
    code, _ = final.terminate_and_wait(20)
    elapsed = time.monotonic() - started
    assert code == 0, final.log_tail()

    delivered.refresh()
    check_message_id_header(smtp_server)
    assert set(delivered.counts) == all_message_ids(db_url), "every row, and nothing else, mailed"
    assert scalar(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0

    # Attribute each duplicate to the kill that ended the run that first delivered it.
    first_seen: dict[str, int] = {}
    for position, message_id in enumerate(delivered.ids):
        first_seen.setdefault(message_id, position)
    per_kill = [0] * (kills + 1)
    for message_id, count in delivered.counts.items():
        if count > 1:
            position = first_seen[message_id]
            k = next((i for i, b in enumerate(boundaries) if position < b), kills)
            per_kill[k] += count - 1
    print(
        f"\n[kill -9] seed={seed} messages={n} kills={kills} batch={BATCH} "
        f"mails={delivered.total} distinct={delivered.distinct} "
        f"duplicates={delivered.duplicates} max_copies={max(delivered.counts.values())} "
        f"in {elapsed:.1f}s"
    )
    print("[kill -9] kill moments:", ", ".join(moments))
    print("[kill -9] duplicates per kill:", per_kill[:kills], "after the last:", per_kill[kills])
    assert delivered.distinct == n
    assert delivered.duplicates <= kills * BATCH, "a kill duplicated more than its one batch"
