"""Dead letters without services: bounding, encoding, the wire form, the per-batch book,
and the watch over tasks that keep failing."""

from __future__ import annotations

import json

import pytest

from engine.errors import UserFunctionError
from engine.executor import DeadLetter
from engine.graph import Node
from engine.plan import TaskSpec
from ops import protocol as wire
from ops.coordinator.dead_letters import LetterBook
from ops.coordinator.retries import RetryWatch
from ops.sinks import (
    Encoded,
    bound_letter,
    dead_letter_reason,
    encode_output,
    encode_records,
    letter_headers,
)


def _letter(offset: int, op: str = "map#1", value: bytes = b"v") -> DeadLetter:
    return DeadLetter("in", 0, offset, op, "ValueError: bad", value)


def _spec() -> TaskSpec:
    return TaskSpec("out/3/7/1", "output", 3, 0, 7, 1, (), "out:3")


def _node(sink: str = "kafka", fmt: str = "json") -> Node:
    args = {"sink": sink, "topic": "out", "format": fmt, "mode": "hash", "hash_name": "h"}
    return Node(3, "output", (), args, "to_kafka")


def test_a_large_letter_is_cut_to_its_first_kilobyte_with_its_size() -> None:
    big = bytes(range(256)) * 20_000  # 5,120,000 bytes
    d = bound_letter(_letter(5, "source#0.decode", big), 1_000_000)
    assert d.value == big[:1024] and d.original_size == len(big)
    assert (d.topic, d.partition, d.offset, d.operator) == ("in", 0, 5, "source#0.decode")
    h = dict(letter_headers(d, 1000, 7))
    assert h["dstream-truncated"] == b"true" and h["dstream-size"] == b"5120000"
    assert h["dstream-batch"] == b"1000" and h["dstream-source-offset"] == b"5"
    small = _letter(1)
    assert bound_letter(small, 1_000_000) is small
    assert "dstream-truncated" not in dict(letter_headers(small, 0, 0))


def test_task_done_carries_its_letters_over_the_wire() -> None:
    letters = [_letter(1), bound_letter(_letter(2, value=b"x" * 50), 10)]
    done = wire.TaskDone("m/1/0/0", 0, "w", 0, 10, 2, 0.1, letters)
    back = wire.TaskDone.from_wire(done.to_wire())
    assert back == done and back.letters[1].original_size == 50


def test_unencodable_and_oversize_records_become_encode_letters() -> None:
    records = [("a", 1), ("b", complex(1, 2)), ("c", "x" * 5000), ("d", {3, 1, 2})]
    out, dead = encode_records(_node(), _spec(), records, max_message_bytes=4000)
    assert [type(r) for r in out] == [Encoded, Encoded]
    assert [json.loads(r[0]) for r in out] == ["a", "d"]
    assert json.loads(out[1][1]) == [1, 2, 3]  # a set: sorted by value
    assert [d.operator for d in dead] == ["to_kafka.encode"] * 2
    assert dead[0].error == "TypeError: cannot encode complex as JSON"
    assert (dead[0].topic, dead[0].partition, dead[0].offset) == ("out", 1, -1)
    assert "message.max.bytes 4000" in dead[1].error
    assert dead_letter_reason(dead[0].operator) == "encode"
    with pytest.raises(UserFunctionError, match="complex"):
        encode_records(_node(), _spec(), records, max_message_bytes=4000, fail=True)


def test_sets_of_mixed_types_encode_deterministically() -> None:
    _k, v = encode_output(("k", {1, "a"}), "json")
    assert json.loads(v) == sorted([1, "a"], key=repr)


def test_the_book_keeps_the_first_completion_of_each_task_in_batch_order() -> None:
    book = LetterBook()
    book.accepted(2, 2000, "m/1/2/0", [_letter(20)])
    book.accepted(1, 1000, "m/1/1/0", [_letter(10), _letter(11)])
    book.accepted(1, 1000, "m/1/1/0", [_letter(99)])  # a recomputation: ignored
    book.accepted(1, 1000, "m/1/1/1", [])
    # one source block decoded by two tasks: its decode letter is kept once
    dec = _letter(12, "source#0.decode")
    book.accepted(1, 1000, "m/2/1/0", [dec])
    book.accepted(1, 1000, "m/3/1/0", [dec])
    assert book.take_upto(0) == []
    (b1,) = book.take_upto(1)
    assert (b1.batch, b1.time_ms) == (1, 1000)
    assert [d.offset for d in b1.letters] == [10, 11, 12]
    assert book.pending() == 1
    (b2,) = book.take_upto(5)
    assert b2.batch == 2 and [d.offset for d in b2.letters] == [20]
    assert book.take_upto(5) == []


def test_a_task_failing_past_the_bound_is_reported_once_and_cleared_on_success() -> None:
    w = RetryWatch(alert_after=60.0)
    assert w.failed("out/4/1/0", "DStreamError: kafka down", now=0.0) is None
    assert w.failed("out/4/1/0", "DStreamError: kafka down", now=30.0) is None
    stuck = w.failed("out/4/1/0", "DStreamError: timed out", now=61.0)
    assert stuck is not None and stuck.task == "out/4/1/0" and stuck.failures == 3
    assert "timed out" in str(stuck) and "61 s" in str(stuck)
    assert w.stuck == 1
    assert w.failed("out/4/1/0", "DStreamError: still", now=90.0) is None  # once only
    assert w.succeeded("out/4/1/0") is not None
    assert w.stuck == 0 and w.failing() == 0
    assert w.succeeded("out/4/1/0") is None
    w.failed("m/1/2/0", "e", now=0.0)
    w.forget(["other"])
    assert w.failing() == 0
