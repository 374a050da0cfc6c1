"""Fixtures of the fault tests: relay processes that are always killed at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.helpers import RelayFactory


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[RelayFactory]:
    factory = RelayFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close_all()
