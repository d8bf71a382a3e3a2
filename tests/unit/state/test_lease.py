"""The leader lease of the in-memory metadata log (the Redis one: tests/integration)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from state.metalog import MemoryMetaLog, MetaLog
from tests.unit.state.lease_contract import CHECKS


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_memory_lease(check: Callable[[MetaLog], None]) -> None:
    check(MemoryMetaLog())
