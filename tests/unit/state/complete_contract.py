"""The per-batch metadata writes' contract, run against every :class:`MetaLog` backend.

``log_batch`` stores a batch's ranges exactly (whatever form it is encoded in), and
``complete`` sets checkpoint pointers, the done mark and forgets old lineage together,
fenced like each single write.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from engine.errors import FencedError
from state.metalog import MetaLog, OffsetRange


def ranges_of(b: int, workers: int, per_worker: int = 4) -> dict[str, OffsetRange]:
    """Offset ranges of *workers* x *per_worker* input partitions of two topics."""
    out = {}
    for i in range(workers * per_worker):
        topic = "views" if i % 2 else "clicks"
        start = 10**9 + 1000 * b + i  # offsets past 2**32 are stored exactly too
        out[f"in/{i % 3}/{b}/{i}"] = OffsetRange(topic, i // 2, start, start + i % 7, i % 7)
    return out


def check_ranges_round_trip(log: MetaLog) -> None:
    e = log.bump_epoch()
    batches = {b: ranges_of(b, 25) for b in range(3)}
    batches[3] = {}  # a batch nobody reported a block of
    batches[4] = {"in/0/4/0": OffsetRange("t", 0, 5, 9, 3)}  # compacted: 3 of 4 offsets
    for b, r in batches.items():
        log.log_batch(e, b, r, 1000 * b)
    got = log.logged()
    assert {b: lb.ranges for b, lb in got.items()} == batches
    assert {b: lb.time_ms for b, lb in got.items()} == {b: 1000 * b for b in batches}


def check_complete_sets_pointers_done_and_forgets(log: MetaLog) -> None:
    e = log.bump_epoch()
    for b in range(6):
        log.log_batch(e, b, ranges_of(b, 2), b)
    log.complete(e, 3, [(2, 0, 3), (2, 1, 2), (5, 0, 1)], keep_from=2)
    assert log.done() == 3
    assert log.checkpoints() == {(2, 0): 3, (2, 1): 2, (5, 0): 1}
    assert sorted(log.logged()) == [2, 3, 4, 5]
    log.complete(e, 2, [(2, 0, 1), (2, 1, 4)], keep_from=0)  # lower marks change nothing
    assert log.done() == 3
    assert log.checkpoints() == {(2, 0): 3, (2, 1): 4, (5, 0): 1}
    assert sorted(log.logged()) == [2, 3, 4, 5]


def check_complete_is_fenced(log: MetaLog) -> None:
    old = log.bump_epoch()
    log.log_batch(old, 0, ranges_of(0, 1), 0)
    log.bump_epoch()
    with pytest.raises(FencedError):
        log.complete(old, 0, [(1, 0, 0)], keep_from=1)
    assert log.done() is None and log.checkpoints() == {} and list(log.logged()) == [0], (
        "a fenced completion writes nothing"
    )


CHECKS: list[Callable[[MetaLog], None]] = [
    check_ranges_round_trip,
    check_complete_sets_pointers_done_and_forgets,
    check_complete_is_fenced,
]
