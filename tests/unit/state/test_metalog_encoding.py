"""The stored form of a logged batch: compact, exact, and older forms still read."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from engine.codec import pack, unpack
from state.metalog import (
    LoggedBatch,
    MemoryMetaLog,
    MetaLog,
    OffsetRange,
    decode_logged,
    encode_logged,
)
from tests.unit.state.complete_contract import CHECKS, ranges_of


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_memory_backend(check: Callable[[MetaLog], None]) -> None:
    check(MemoryMetaLog())


@pytest.mark.parametrize("workers", [1, 10, 1000])
def test_compact_form_round_trips_exactly(workers: int) -> None:
    ranges = ranges_of(7, workers)
    got = decode_logged(unpack(encode_logged(7, 1234, ranges)))
    assert got == LoggedBatch(1234, ranges)


def test_compact_form_is_small() -> None:
    """1,000 workers x 4 partitions: at most 16 bytes per partition (explicit: ~38)."""
    ranges = ranges_of(123456, 1000)
    compact = len(encode_logged(123456, 1, ranges))
    explicit = len(pack({"time_ms": 1, "ranges": {k: list(v) for k, v in ranges.items()}}))
    assert compact <= 16 * len(ranges), compact
    assert compact * 2 < explicit, (compact, explicit)


@pytest.mark.parametrize(
    "bid",
    ["sh/1/7/0/2", "in/0/8/1", "in/01/7/1", "in/0/7/x", "in/0/7"],
    ids=["shuffle", "other-batch", "leading-zero", "not-a-number", "short"],
)
def test_a_block_id_the_compact_form_cannot_rebuild_keeps_the_explicit_form(bid: str) -> None:
    ranges = {"in/0/7/0": OffsetRange("t", 0, 1, 2, 1), bid: OffsetRange("t", 1, 3, 5, 2)}
    value = unpack(encode_logged(7, 99, ranges))
    assert "ranges" in value
    assert decode_logged(value) == LoggedBatch(99, ranges)


def test_older_forms_are_still_read() -> None:
    rng = OffsetRange("t", 0, 5, 9, 4)
    explicit = {"time_ms": 4000, "ranges": {"in/0/4/0": list(rng)}}
    legacy = {"in/0/4/0": list(rng), "@time": ["", 0, 4000, 4000, 0]}
    for value in (explicit, legacy):
        assert decode_logged(unpack(pack(value))) == LoggedBatch(4000, {"in/0/4/0": rng})
