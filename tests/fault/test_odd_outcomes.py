"""Outcomes that used to make the settle fail (or end the relay) are stored, and nothing is sent
again because of them: SystemExit and KeyboardInterrupt from a handler, NUL bytes in an error,
a result or the SMTP server's reply, a non-string result, text that is not valid UTF-8."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.fault.helpers import (
    RelayFactory,
    insert_emails,
    insert_rows,
    read_ledger,
    sql,
    wait_until,
)
from web.capture import CaptureServer

pytestmark = pytest.mark.fault

KINDS = [
    "system_exit",
    "keyboard_interrupt",
    "nul_error",
    "nul_result",
    "dict_result",
    "surrogate_error",
]


def test_odd_outcomes_are_settled_once_and_nothing_is_sent_again(
    db_url: str, smtp_server: CaptureServer, relays: RelayFactory, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    ids = insert_rows(db_url, "odd", [json.dumps({"kind": k}) for k in KINDS])
    emails = 10
    insert_emails(db_url, emails)
    smtp_server.reply = "250 2.0.0 Ok: queued \x00 with a NUL"
    relay = relays.start(
        db_url,
        smtp_server.url,
        "--import", "tests.fault.relay_handlers",
        "--max-attempts", "1",
        "--poll-interval", "0.5",
        OUTBOX_TEST_LEDGER=str(ledger),
    )  # fmt: skip
    unsettled = "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND dead_at IS NULL"
    wait_until(lambda: sql(db_url, unsettled)[0][0] == 0, 60, "all settled", alive=[relay])
    time.sleep(2.0)  # a relay that failed to store them would be sending them again by now
    assert relay.alive(), relay.log_tail()
    code, _ = relay.terminate_and_wait(30)

    rows = {
        r[0]: r[1:]
        for r in sql(
            db_url,
            "SELECT id, sent_at IS NOT NULL, dead_at IS NOT NULL, attempts, last_error, result "
            "FROM outbox WHERE id = ANY(%s)",
            (ids,),
        )
    }
    by_kind = dict(zip(KINDS, (rows[i] for i in ids), strict=True))
    runs = Counter(e[1] for e in read_ledger(ledger) if e[0] == "start")
    mail_results = {r[0] for r in sql(db_url, "SELECT result FROM outbox WHERE topic = 'email'")}
    print(f"\n[odd outcomes] {by_kind} smtp_data={smtp_server.data_attempts}")
    assert code == 0, relay.log_tail()
    assert all(runs[i] == 1 for i in ids), runs
    assert smtp_server.data_attempts == emails, "no mail was sent twice"
    assert mail_results == {"250 2.0.0 Ok: queued \\x00 with a NUL"}
    assert by_kind["system_exit"][1:4] == (True, 1, "SystemExit: 3")
    assert by_kind["keyboard_interrupt"][1:4] == (True, 1, "KeyboardInterrupt")
    assert by_kind["nul_error"][1:4] == (True, 1, "ValueError: bad\\x00byte")
    assert by_kind["surrogate_error"][1:4] == (True, 1, "ValueError: broken \\udcff text")
    assert by_kind["nul_result"][0] and by_kind["nul_result"][4] == "ok\\x00then more"
    assert by_kind["dict_result"][0]
    assert by_kind["dict_result"][4] == "{'status': 'ok', 'nul': '\\x00'}"
