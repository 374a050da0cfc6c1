"""Retry decisions: pure functions, driven by a seeded rng."""

from __future__ import annotations

import random

import pytest

from outbox.backoff import next_delay
from outbox.errors import PermanentSendError, TransientSendError, UnknownTopicError
from outbox.outcome import Dead, Retry, classify, describe


@pytest.mark.parametrize(("attempts", "low", "high"), [(1, 1, 2), (2, 2, 4), (5, 16, 32)])
def test_backoff_grows_exponentially_with_a_jitter_floor(
    attempts: int, low: float, high: float
) -> None:
    rng = random.Random(7)
    delays = [next_delay(attempts, base=2, cap=3600, rng=rng) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    assert len({round(d, 6) for d in delays}) > 100  # jittered, not one value


def test_backoff_is_capped() -> None:
    assert next_delay(40, base=2, cap=60, rng=random.Random(1)) <= 60


def classify_(exc: BaseException, attempts: int = 1, max_attempts: int = 5) -> Retry | Dead:
    return classify(
        exc,
        attempts=attempts,
        max_attempts=max_attempts,
        backoff_base=1,
        backoff_cap=10,
        rng=random.Random(0),
    )


def test_outcome_transient_error_retries_until_max_attempts() -> None:
    assert isinstance(classify_(TransientSendError("451 busy"), attempts=4), Retry)
    dead = classify_(TransientSendError("451 busy"), attempts=5)
    assert dead == Dead("TransientSendError: 451 busy")


def test_outcome_permanent_and_unknown_topic_are_dead_at_once() -> None:
    assert isinstance(classify_(PermanentSendError("550 no such user")), Dead)
    assert isinstance(classify_(UnknownTopicError("no handler for 'x'")), Dead)


def test_outcome_unexpected_exception_retries_with_traceback_last_line() -> None:
    empty: dict[str, int] = {}
    try:
        empty["missing"]
    except KeyError as exc:
        outcome = classify_(exc)
    assert isinstance(outcome, Retry)
    assert outcome.error == "KeyError: 'missing'"


def test_outcome_describe_is_bounded() -> None:
    assert len(describe(ValueError("x" * 10_000))) <= 2000
    assert "timeout" in describe(TimeoutError())
