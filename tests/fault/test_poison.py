"""A message whose handler always raises dies after --max-attempts; its neighbours go out."""

from __future__ import annotations

import json
import time

import pytest

from tests.acceptance.cli_helpers import cli_env, run_cli
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


def test_poison_message_ends_dead_and_the_rest_is_delivered(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory
) -> None:
    half = scaled(50)
    insert_emails(db_url, half)
    (poison_id,) = [
        r[0]
        for r in sql(
            db_url,
            "INSERT INTO outbox (topic, payload) VALUES ('poison', '{\"n\": 1}') RETURNING id",
        )
    ]
    insert_emails(db_url, half, first=half + 1)
    emails = all_message_ids(db_url) - {
        str(sql(db_url, "SELECT message_id FROM outbox WHERE id = %s", (poison_id,))[0][0])
    }
    delivered = Delivered(smtp_server)

    def poison_row() -> tuple[int, str | None, object, object]:
        row = sql(
            db_url,
            "SELECT attempts, last_error, dead_at, sent_at FROM outbox WHERE id = %s",
            (poison_id,),
        )[0]
        return row[0], row[1], row[2], row[3]

    started = time.monotonic()
    relay = relays.start(
        db_url,
        smtp_server.url,
        "--import", "tests.fault.poison_handlers",
        "--max-attempts", "3",
        "--backoff-base", "0.1",
        "--backoff-cap", "0.2",
        "--poll-interval", "0.2",
        "--batch-size", "10",
    )  # fmt: skip
    wait_until(
        lambda: poison_row()[2] is not None and delivered.distinct_now() >= 2 * half,
        60,
        "the poison message dead and every email delivered",
        alive=[relay],
    )
    elapsed = time.monotonic() - started
    attempts, last_error, dead_at, sent_at = poison_row()
    time.sleep(0.5)  # a dead message is not picked up again
    assert poison_row()[0] == attempts
    code, _ = relay.terminate_and_wait(20)
    assert code == 0, relay.log_tail()

    dead = json.loads(run_cli("dead", "--json", env=cli_env(DATABASE_URL=db_url)).stdout)
    log = relay.log()
    print(
        f"\n[poison] emails={2 * half} delivered={delivered.distinct} mails={delivered.total} "
        f"poison attempts={attempts} last_error={last_error!r} dead after {elapsed:.1f}s "
        f"handler_raised_log_lines={log.count('handler raised ValueError: poison pill')}"
    )
    assert (attempts, last_error, sent_at) == (3, "ValueError: poison pill", None)
    assert dead_at is not None
    assert [(row["id"], row["last_error"]) for row in dead] == [
        (poison_id, "ValueError: poison pill")
    ]
    assert set(delivered.counts) == emails
    assert delivered.total == delivered.distinct == 2 * half
    assert "handler raised ValueError: poison pill" in log
