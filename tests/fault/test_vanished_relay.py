"""A relay frozen (SIGSTOP) mid-batch: its lease runs out, another relay delivers its messages,
and when it wakes up its late outcomes are refused (fencing) and it carries on as a healthy relay.

Replaces test_frozen_relay.py, whose premise (PostgreSQL ends the frozen relay's idle batch
transaction) was the lock-holding relay's.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.fault.helpers import (
    RelayFactory,
    insert_rows,
    read_ledger,
    sql,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

LEASE = 6.0
JOBS = 8


def test_a_frozen_relays_messages_are_taken_over_and_its_late_outcomes_refused(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    args = (
        "--import", "tests.fault.relay_handlers",
        "--lease", str(LEASE),
        "--concurrency", str(JOBS),
        "--poll-interval", "0.5",
    )  # fmt: skip
    env = {"OUTBOX_TEST_LEDGER": str(ledger)}
    frozen = relays.start(db_url, smtp_server.url, *args, **env)
    frozen.wait_started()
    ids = insert_rows(db_url, "sleep", ['{"seconds": 2}'] * JOBS)
    sql(db_url, "SELECT pg_notify('outbox', '')")
    wait_until(
        lambda: len([e for e in read_ledger(ledger) if e[0] == "start"]) == JOBS,
        30,
        "every job running in the first relay",
        alive=[frozen],
    )
    os.kill(frozen.pid, signal.SIGSTOP)
    frozen_at = time.time()

    other = relays.start(db_url, smtp_server.url, *args, **env)

    def by_other(event: str) -> list[tuple[str, int, int, float]]:
        return [e for e in read_ledger(ledger) if e[0] == event and e[2] == other.pid]

    wait_until(lambda: len(by_other("done")) == JOBS, LEASE + 30, "the takeover", alive=[other])
    wait_until(
        lambda: sql(db_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")[0][0] == 0,
        10,
        "every outcome settled",
        alive=[other],
    )
    first_takeover = min(e[3] for e in by_other("start")) - frozen_at

    os.kill(frozen.pid, signal.SIGCONT)
    wait_until(
        lambda: frozen.log().count("refused") >= JOBS,
        30,
        "the woken relay's outcomes refused",
        alive=[frozen],
    )
    rows = sql(
        db_url, "SELECT attempts, claimed_by FROM outbox WHERE id = ANY(%s) ORDER BY id", (ids,)
    )
    sent_lines = re.findall(r"sent id=(\d+)", frozen.log() + other.log())

    # It carries on: with the other relay gone, it delivers new work.
    code, _ = other.terminate_and_wait(30)
    (fresh,) = insert_rows(db_url, "sleep", ['{"seconds": 0.1}'])
    sql(db_url, "SELECT pg_notify('outbox', '')")
    wait_until(
        lambda: [e for e in read_ledger(ledger) if e[0] == "done" and e[1] == fresh],
        30,
        "the woken relay to deliver a new message",
        alive=[frozen],
    )
    print(
        f"\n[SIGSTOP] jobs={JOBS} lease={LEASE:.0f}s first taken over after {first_takeover:.1f}s "
        f"refused={frozen.log().count('refused')} attempts={sorted({r[0] for r in rows})}"
    )
    assert code == 0
    assert LEASE - 3 <= first_takeover <= LEASE + 2.5, "taken over when the lease ran out"
    assert [r[0] for r in rows] == [2] * JOBS, "one attempt per claim, no more"
    assert all(r[1] is None for r in rows)
    assert sorted(int(i) for i in sent_lines) == sorted(ids), "each row settled exactly once"
    assert "Traceback" not in frozen.log()
