"""A smoke run of the benchmark suite at tiny sizes, so the bench code cannot rot.

Not a benchmark: nothing here is timed or compared. It runs this project's own scenarios (the
signup endpoint against the seed's inline-mail version and the no-mail floor, SMTP throughput
against the bare client, the no-op queue against the SQL ceiling and the sweep of our settings,
the email job, end-to-end latency, scale, NOTIFY cost, the drain with hung sends, the drain
while a snapshot is held on a cluster the bench starts itself) against real PostgreSQL, relay
processes and the bench's SMTP sink, and renders the page without charts. The peers
(procrastinate, pgqueuer, Celery) and matplotlib live only in the bench's own environment
(.venv-bench) and are left out here.
"""

from __future__ import annotations

import glob
import math
import os
import tempfile
from pathlib import Path

import pytest

from bench import report
from bench.__main__ import ITEMS, run
from bench.harness import SIZES
from bench.sink import Sink
from bench.stats import percentile, rate_10_90

pytestmark = pytest.mark.timeout(240)


def test_rate_window_counts_steps_exactly() -> None:
    # Ten batches of 100 settled one second apart: 100 messages a second, whatever the steps.
    times = [float(k) for k in range(10) for _ in range(100)]
    assert rate_10_90(times) == pytest.approx(100.0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_sink_counts_and_records_message_ids() -> None:
    import smtplib

    with Sink() as sink:
        with smtplib.SMTP(sink.host, sink.port) as client:
            client.sendmail(
                "a@example.com",
                ["b@example.com"],
                b"Message-ID: <abc@example.com>\r\nSubject: x\r\n\r\nhello\r\n",
            )
        assert sink.wait_count(1, timeout=5)
        times, ids = sink.records()
        assert ids == [b"<abc@example.com>"] and len(times) == 1


def test_smoke_run_writes_the_page(pg_admin_url: str, tmp_path: Path) -> None:
    clusters_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "outbox-bench-pg-*")))
    data = run(pg_admin_url, SIZES["smoke"], ITEMS, tmp_path / "results.json")
    errors = {k: v["error"] for k, v in data["items"].items() if "error" in v}
    assert not errors
    items = data["items"]
    assert all(row["relay"] > 0 and row["ceiling"] > 0 for row in items["smtp"]["rows"])
    assert all(row["relay"] > 0 and row["sql"] > 0 for row in items["noop"]["rows"])
    assert items["email"]["rate"] > 0
    latency = items["latency"]["50"]
    assert latency["delivered"] == latency["offered"] > 0
    assert not math.isnan(latency["p99"])
    assert items["notify"]["with"] > 0 and items["notify"]["without"] > 0
    web = items["web"]["variants"]  # item 1 without Celery (not in this environment)
    assert set(web) == {"outbox", "inline", "nomail"}
    assert all(v["requests"] > 0 and v["errors"] == 0 for v in web.values())
    assert web["inline"]["p50"] >= 1000  # the handler waited for the 1 s mail server
    sweep = items["noop"]["sweep"]  # our own settings swept, the best one timed
    assert sweep["rate"] > 0 and sweep["setting"] in [p["setting"] for p in sweep["grid"]]
    assert items["email"]["sweep"]["rate"] > 0

    stall = items["stall"]  # 400 messages: none hung, 1 hung, 4 hung
    n = stall["messages"]
    assert stall["cases"]["none"]["sent"] == n
    assert stall["cases"]["1 per 400"]["retrying"] == n // 400
    assert stall["cases"]["1 per 100"]["retrying"] == n // 100
    assert stall["cases"]["1 per 100"]["sent"] == n - n // 100
    # Every hung send was cut off by the send timeout, so the drain took at least that long.
    assert stall["cases"]["1 per 100"]["seconds"] >= stall["send_timeout"]

    snap = items["snapshot"]
    assert snap["cluster"]["autovacuum"] == "on"  # production settings, not the test server's
    assert snap["snapshot"]["state"] == "idle in transaction"
    assert snap["snapshot"]["xmin_age"] > 0  # the snapshot held the horizon back
    assert snap["held"]["dead_end"] >= snap["fill"]  # at least a round's purge stayed dead
    assert snap["without"]["median"] > 0 and snap["held"]["median"] > 0
    # The cluster is stopped and its folder deleted.
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "outbox-bench-pg-*")))
    assert after <= clusters_before

    page = report.write(data, tmp_path / "docs", charts=False)
    text = page.read_text()
    for heading in (
        "## 1.",
        "## 2.",
        "## 3.",
        "## 4.",
        "## 5.",
        "## 6.",
        "## 7.",
        "## 8.",
        "## 9.",
        "## Closing note",
    ):
        assert heading in text
    assert "held" in text or "missed" in text
