"""A table partition's first block reads up to its load target, whatever the record cap.

The receiver's bookkeeping is driven with fake Kafka messages (no consumer thread).
"""

from __future__ import annotations

from typing import Any

from ingest.receiver import Assignment, Receivers


class _Msg:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._t, self._p, self._o = topic, partition, offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes:
        return b"%d" % self._o

    def key(self) -> bytes:
        return b"k%d" % self._o

    def timestamp(self) -> tuple[int, int]:
        return (1, 1000 + self._o)


class _NoThread(Receivers):
    def _run(self) -> None:  # the test feeds the messages itself
        return


def _receivers(cap: int) -> Receivers:
    r = _NoThread({}, max_records=cap)
    r.assign(
        [
            Assignment(0, 0, "views", 0, 0),
            Assignment(1, 0, "users", 0, 0, True, None, 25),
        ]
    )
    r._reassign.clear()  # as the polling thread does once it applied the assignment
    return r


def _feed(r: Receivers, topic: str, offsets: range) -> None:
    r._reassign.clear()  # the polling thread applied any pause before the next fetch
    r._append([_Msg(topic, 0, o) for o in offsets])


def test_the_cap_does_not_cut_a_table_partition_below_its_target() -> None:
    r = _receivers(cap=10)
    _feed(r, "views", range(30))
    _feed(r, "users", range(30))
    assert r.wait_loaded(0.0) == [("users", 0, 25, 25)]  # then paused by the cap
    blocks = {b.topic: b for b in r.seal(0)}
    assert (blocks["views"].start, blocks["views"].until) == (0, 10)  # capped
    assert (blocks["users"].start, blocks["users"].until) == (0, 25)  # up to its target
    # the target applies to the first block only: then the cap holds again
    _feed(r, "users", range(25, 60))
    assert r.loads() == []
    (users,) = [b for b in r.seal(1) if b.topic == "users"]
    assert (users.start, users.until, users.count) == (25, 35, 10)


def test_wait_loaded_reports_the_partitions_still_below_their_target() -> None:
    r = _receivers(cap=0)
    _feed(r, "users", range(12))
    assert r.wait_loaded(0.05) == [("users", 0, 12, 25)]
    _feed(r, "users", range(12, 25))
    assert r.wait_loaded(5.0) == [("users", 0, 25, 25)]


def test_an_empty_target_needs_no_wait() -> None:
    r = _NoThread({}, max_records=5)
    r.assign([Assignment(1, 0, "users", 0, 40, True, None, 40)])
    assert r.wait_loaded(5.0) == [("users", 0, 40, 40)]
    blocks: list[Any] = r.seal(0)
    assert [(b.start, b.until) for b in blocks] == [(40, 40)]
