"""The dashboard's pure parts: chart geometry, search parsing, the login throttle, the session."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from outbox.dashboard.auth import LoginThrottle, SessionCodec, new_session, password_matches
from outbox.dashboard.chart import HEIGHT, build_chart
from outbox.dashboard.queries import MinuteCounts, like_pattern, search_key

START = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def _series(counts: list[tuple[int, int]]) -> list[MinuteCounts]:
    return [MinuteCounts(START + timedelta(minutes=i), s, d) for i, (s, d) in enumerate(counts)]


def test_chart_bars_are_proportional_and_stack_dead_on_sent() -> None:
    chart = build_chart(_series([(0, 0)] * 58 + [(30, 0), (40, 10)]))
    assert chart.scale_max == 50  # the next of 1, 2, 5 x 10^n at or above the busiest minute
    full = chart.baseline - chart.top
    last = chart.bars[-1]
    assert last.sent_height == round(full * 40 / 50, 2)
    assert last.dead_height == round(full * 10 / 50, 2)
    assert last.dead_y + last.dead_height == last.sent_y  # dead sits on top of sent
    assert chart.bars[0].sent_height == 0 and chart.bars[0].dead_height == 0
    assert (chart.total_sent, chart.total_dead) == (70, 10)
    assert last.label == "09:59 UTC: 40 sent, 10 dead"
    assert [label for _, label in chart.ticks] == [
        "-60 min",
        "-45 min",
        "-30 min",
        "-15 min",
        "now",
    ]


def test_chart_of_a_quiet_hour_has_a_scale_and_no_bar_height() -> None:
    chart = build_chart(_series([(0, 0)] * 60))
    assert chart.scale_max == 1
    assert all(bar.sent_height == 0 and bar.dead_height == 0 for bar in chart.bars)
    assert all(0 <= bar.x <= chart.width for bar in chart.bars) and chart.height == HEIGHT


def test_search_key_finds_a_message_id_in_a_header_or_an_id() -> None:
    value = uuid.uuid4()
    assert search_key(f"<{value}@example.com>") == (value, None)
    assert search_key(str(value).upper()) == (value, None)
    assert search_key("#42") == (None, 42)
    assert search_key(" 42 ") == (None, 42)
    assert search_key("ann@example.com") == (None, None)
    assert search_key(str(2**64)) == (None, None)  # beyond bigint: a text search instead


def test_like_pattern_takes_wildcards_literally() -> None:
    assert like_pattern("50%_off\\") == "%50\\%\\_off\\\\%"


def test_login_throttle_blocks_after_the_limit_until_the_oldest_failure_ages_out() -> None:
    now = [0.0]
    throttle = LoginThrottle(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("203.0.113.9") == 0
        throttle.failed("203.0.113.9")
        now[0] += 10
    assert throttle.retry_after("203.0.113.9") == 30  # the first failure ages out at 60
    assert throttle.retry_after("198.51.100.1") == 0  # another address is not blocked
    now[0] = 60
    assert throttle.retry_after("203.0.113.9") == 0
    throttle.failed("203.0.113.9")
    throttle.succeeded("203.0.113.9")
    assert throttle.retry_after("203.0.113.9") == 0


def test_session_cookie_is_refused_when_signed_by_another_key_or_tampered() -> None:
    ours, theirs = SessionCodec("k1"), SessionCodec("k2")
    session = new_session(authenticated=True)
    value = ours.dump(session)
    assert ours.load(value) == session
    assert theirs.load(value) is None
    assert ours.load(value.replace(".", "x", 1)) is None
    assert ours.load(None) is None


def test_password_matches_only_the_same_password() -> None:
    assert password_matches("s3cret pass", "s3cret pass")
    assert not password_matches("s3cret pass", "s3cret pas")
    assert not password_matches("s3cret pass", "")


def test_chart_keeps_a_single_dead_message_visible_beside_a_busy_minute() -> None:
    chart = build_chart(_series([(5000, 0), (5000, 1)]))
    assert chart.bars[1].dead_height >= 3
    assert chart.bars[0].dead_height == 0
