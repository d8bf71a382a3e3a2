"""Lost metadata in the in-memory metadata log (the Redis one: tests/integration)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from state.metalog import MemoryMetaLog, MetaLog
from tests.unit.state.metadata_lost_contract import CHECKS


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_memory_metadata_lost(check: Callable[[MetaLog, Callable[[], None]], None]) -> None:
    log = MemoryMetaLog()
    check(log, log.wipe)
