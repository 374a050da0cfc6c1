"""RelayConfig's slow-send settings: defaults follow the other settings, typos fail at start."""

from __future__ import annotations

import pytest

from outbox import RelayConfig
from outbox.errors import ConfigError


def test_relay_config_a_send_is_slow_after_an_eighth_of_the_send_timeout_by_default() -> None:
    assert RelayConfig().slow_threshold == 30.0 / 8
    assert RelayConfig(send_timeout=2.0).slow_threshold == 0.25
    assert RelayConfig(send_timeout=2.0, slow_after=0.1).slow_threshold == 0.1


def test_relay_config_as_many_slow_sends_as_workers_by_default() -> None:
    assert RelayConfig(concurrency=5).slow_cap == 5
    assert RelayConfig(concurrency=5, max_slow=0).slow_cap == 0
    assert RelayConfig(concurrency=5, max_slow=12).slow_cap == 12


def test_relay_config_parked_sends_do_not_move_the_stop_bound() -> None:
    """Parking starts no send after a stop: every send running began before it, and ends
    within ``send_timeout`` of its start, parked or not."""
    assert RelayConfig(send_timeout=10, stop_grace=5, max_slow=100).stop_bound == 15
    assert RelayConfig(send_timeout=10, stop_grace=5, max_slow=0).stop_bound == 15


@pytest.mark.parametrize(
    ("fields", "flag"),
    [({"slow_after": 0}, "--slow-after"), ({"max_slow": -1}, "--max-slow")],
)
def test_relay_config_refuses_bad_slow_settings(fields: dict[str, float], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        RelayConfig(**fields)  # type: ignore[arg-type]
