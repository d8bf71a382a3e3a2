"""In-process dead letters: raising user functions and undecodable input.

A bad record is dead-lettered (with its source coordinates, the operator and the error)
and the rest of the batch is computed exactly; with ``fail_on_error`` the run stops with a
:class:`UserFunctionError` naming the operator and the record.
"""

from __future__ import annotations

import json
import operator
from typing import Any

import pytest

from engine import StreamingContext
from engine.codec import encode_input_block
from engine.errors import UserFunctionError
from engine.local import LocalRunner
from engine.reference import ReferenceRunner
from engine.sinks import LocalSinks
from engine.testing import assert_batches_equal, run_pipeline, run_reference

BATCHES = [[1, 2, 0, 4], [0, 0], [5], [], [10, 0, 3]]
BAD = 0


def _inverse(x: int) -> float:
    return 60 / x  # ZeroDivisionError on 0


def _good(batches: list[list[int]]) -> list[list[int]]:
    return [[x for x in b if x != BAD] for b in batches]


@pytest.mark.parametrize("num_partitions", [1, 3])
def test_raising_map_dead_letters_and_keeps_the_rest_exact(num_partitions: int) -> None:
    sinks = LocalSinks()
    got = run_pipeline(
        BATCHES, lambda s: s.map(_inverse), sinks=sinks, num_partitions=num_partitions
    )
    expected = run_reference(_good(BATCHES), lambda s: s.map(_inverse))
    assert_batches_equal(got, expected, ordered=True)
    assert_batches_equal(got, [[60.0, 30.0, 15.0], [], [12.0], [], [6.0, 20.0]], ordered=True)

    dead = sinks.dead
    assert len(dead) == sum(b.count(BAD) for b in BATCHES) == 4
    assert {d.operator for d in dead} == {"map#1"}
    assert all(d.error.startswith("ZeroDivisionError") for d in dead)
    assert all(json.loads(d.value) == BAD for d in dead)
    # queue_stream records are located by their index in the batch
    assert sorted(d.offset for d in dead) == [0, 1, 1, 2]
    # accounting: records in = records out + dead-lettered
    assert sum(map(len, BATCHES)) == sum(map(len, got)) + len(dead)


def test_raising_filter_and_flat_map() -> None:
    sinks = LocalSinks()

    def func(s: Any) -> Any:
        return s.filter(lambda x: 1 / x > 0.1).flat_map(lambda x: [x] * (5 // (x - 2)))

    got = run_pipeline([[1, 0, 2, 3, 4]], func, sinks=sinks)
    # 0: filter raises; 1: 5 // -1 copies = none; 2: flat_map raises; 3: 5 copies; 4: 2
    assert_batches_equal(got, [[3, 3, 3, 3, 3, 4, 4]])
    assert sorted((d.operator, json.loads(d.value)) for d in sinks.dead) == [
        ("filter#1", 0),
        ("flat_map#2", 2),
    ]


def test_raising_map_values_before_a_shuffle() -> None:
    sinks = LocalSinks()
    batches = [[("a", 1), ("a", 0), ("b", 2)], [("b", 0), ("b", 4)]]

    def func(s: Any) -> Any:
        return s.map_values(lambda v: 4 // v).reduce_by_key(operator.add)

    got = run_pipeline(batches, func, sinks=sinks, num_partitions=2)
    good = [[kv for kv in b if kv[1] != 0] for b in batches]
    assert_batches_equal(got, run_reference(good, func))
    assert_batches_equal(got, [[("a", 4), ("b", 2)], [("b", 1)]])
    assert [json.loads(d.value) for d in sinks.dead] == [["a", 0], ["b", 0]]
    assert {d.operator for d in sinks.dead} == {"map_values#1"}


def test_malformed_record_for_a_keyed_operator() -> None:
    sinks = LocalSinks()
    got = run_pipeline(
        [[("a", 1), "not a pair", ("a", 2)]], lambda s: s.reduce_by_key(operator.add), sinks=sinks
    )
    assert_batches_equal(got, [[("a", 3)]])
    (d,) = sinks.dead
    assert d.operator == "reduce_by_key#1"
    assert json.loads(d.value) == "not a pair"


def test_raising_reduce_function_dead_letters_the_value() -> None:
    sinks = LocalSinks()

    def add_but_not_13(a: int, b: int) -> int:
        if b == 13:
            raise ValueError("unlucky")
        return a + b

    got = run_pipeline(
        [[("a", 1), ("a", 13), ("a", 2), ("b", 5)]],
        lambda s: s.reduce_by_key(add_but_not_13),
        sinks=sinks,
    )
    assert_batches_equal(got, [[("a", 3), ("b", 5)]])
    (d,) = sinks.dead
    assert d.operator == "reduce_by_key#1"
    assert d.error == "ValueError: unlucky"


def test_a_shared_stream_dead_letters_once() -> None:
    # the mapped stream has two consumers, so it is persisted: _inverse runs once a record
    sinks = LocalSinks()

    def func(s: Any) -> Any:
        inv = s.map(_inverse)
        return inv.union(inv.map(lambda x: -x))

    got = run_pipeline([[1, 0, 2]], func, sinks=sinks)
    assert_batches_equal(got, [[60.0, 30.0, -60.0, -30.0]])
    assert len(sinks.dead) == 1


def test_raising_transform_dead_letters_the_batch() -> None:
    sinks = LocalSinks()

    def only_short(records: list[int]) -> list[int]:
        if len(records) > 2:
            raise RuntimeError("too long")
        return sorted(records)

    got = run_pipeline([[2, 1], [1, 2, 3], [7]], lambda s: s.transform(only_short), sinks=sinks)
    assert_batches_equal(got, [[1, 2], [], [7]])
    (d,) = sinks.dead
    assert d.operator == "transform#1"
    assert "too long" in d.error


def test_raising_state_function_keeps_the_other_keys() -> None:
    sinks = LocalSinks()

    def update(values: list[int], old: int | None) -> int:
        if -1 in values:
            raise ValueError("negative")
        return (old or 0) + sum(values)

    got = run_pipeline(
        [[("a", 1), ("b", 1)], [("a", -1), ("b", 2)], [("a", 5)]],
        lambda s: s.update_state_by_key(update),
        sinks=sinks,
    )
    # a's failed update leaves its state as it was
    assert_batches_equal(got, [[("a", 1), ("b", 1)], [("b", 3)], [("a", 6)]])
    (d,) = sinks.dead
    assert d.operator == "state#1"


def test_raising_window_filter_drops_the_key() -> None:
    sinks = LocalSinks()

    def keep(kv: tuple[str, int]) -> bool:
        if kv[0] == "bad":
            raise ValueError("bad key")
        return kv[1] != 0

    got = run_pipeline(
        [[("a", 1), ("bad", 2)], [("a", 2)]],
        lambda s: s.reduce_by_key_and_window(operator.add, operator.sub, 2, 1, filter_fn=keep),
        sinks=sinks,
    )
    assert_batches_equal(got, [[("a", 1)], [("a", 3)]])
    (d,) = sinks.dead
    assert d.operator == "window_reduce#1"
    assert d.error == "ValueError: bad key"
    assert json.loads(d.value) == ["bad", 2]
    with pytest.raises(UserFunctionError, match=r"window_reduce#1.*\('bad', 2\)"):
        run_pipeline(
            [[("bad", 2)]],
            lambda s: s.reduce_by_key_and_window(operator.add, None, 1, filter_fn=keep),
            fail_on_error=True,
        )


@pytest.mark.parametrize("num_partitions", [1, 2])
def test_fail_on_error_raises_user_function_error(num_partitions: int) -> None:
    with pytest.raises(UserFunctionError) as ei:
        run_pipeline(
            BATCHES, lambda s: s.map(_inverse), fail_on_error=True, num_partitions=num_partitions
        )
    err = ei.value
    msg = str(err)
    assert "map#1" in msg
    assert "record 0" in msg
    assert "ZeroDivisionError" in msg
    assert err.operator == "map#1"
    assert err.record == 0
    assert isinstance(err.error, ZeroDivisionError)


def test_fail_on_error_in_a_reduce() -> None:
    def boom(a: int, b: int) -> int:
        raise KeyError(b)

    with pytest.raises(UserFunctionError, match=r"reduce_by_key#1.*KeyError.*\('k', 2\)"):
        run_pipeline([[("k", 1), ("k", 2)]], lambda s: s.reduce_by_key(boom), fail_on_error=True)


# -- undecodable Kafka input ---------------------------------------------------------------
def _kafka_graph(fmt: str = "json") -> tuple[StreamingContext, int, list[list[Any]]]:
    ssc = StreamingContext(1.0, num_partitions=2)
    src = ssc.kafka_stream("events", value_format=fmt)
    out: list[list[Any]] = []
    src.map(lambda rec: (rec["user"], 10 // rec["n"])).reduce_by_key(operator.add).foreach_batch(
        lambda _t, recs: out.append(recs)
    )
    return ssc, src.node.id, out


#: per (batch, partition): raw Kafka values from offset 100 on
_RAW = {
    (0, 0): [b'{"user": "u1", "n": 1}', b"{not json", b'{"user": "u2", "n": 2}'],
    (0, 1): [b'{"user": "u1", "n": 5}', b'{"user": "u3", "n": 0}'],
    (1, 0): [b"\xff\xfe", b'{"user": "u2", "n": 10}'],
    (1, 1): [],
}


def _blocks(node_id: int, b: int) -> dict[str, bytes]:
    blocks = {}
    for p in range(2):
        values = _RAW[(b, p)]
        offsets = list(range(100, 100 + len(values)))
        blocks[f"in/{node_id}/{b}/{p}"] = encode_input_block(
            "events", p, 100, 100 + len(values), values, offsets=offsets
        )
    return blocks


def test_undecodable_input_is_dead_lettered_with_its_coordinates() -> None:
    ssc, node_id, out = _kafka_graph()
    runner = LocalRunner(ssc, source_partitions={node_id: 2})
    for b in range(2):
        runner.run_batch(input_blocks=_blocks(node_id, b))

    # the good records, exactly
    assert_batches_equal(out, [[("u1", 12), ("u2", 5)], [("u2", 1)]])
    dead = sorted(runner.sinks.dead, key=lambda d: (d.partition, d.offset, d.value))
    coords = [(d.topic, d.partition, d.offset, d.operator) for d in dead]
    assert coords == [
        ("events", 0, 100, "source#0.decode"),  # batch 1: b"\xff\xfe"
        ("events", 0, 101, "source#0.decode"),  # batch 0: b"{not json"
        ("events", 1, 101, "map#1"),  # n=0
    ]
    assert dead[0].value == b"\xff\xfe"
    assert dead[1].value == b"{not json"
    assert dead[1].error.startswith("JSONDecodeError")
    assert dead[2].error.startswith("ZeroDivisionError")
    assert json.loads(dead[2].value) == {"user": "u3", "n": 0}
    # accounting: every input record is either in a result or dead-lettered
    total_in = sum(len(v) for v in _RAW.values())
    reached_reduce = 4  # u1 n1, u2 n2, u1 n5, u2 n10
    assert total_in == reached_reduce + len(dead)


def test_undecodable_input_matches_the_reference_on_the_good_records() -> None:
    ssc, node_id, out = _kafka_graph()
    runner = LocalRunner(ssc, source_partitions={node_id: 2})
    for b in range(2):
        runner.run_batch(input_blocks=_blocks(node_id, b))
    from engine.reference import ReferenceRunner

    good: list[list[Any]] = []
    for b in range(2):
        recs = []
        for p in range(2):
            for v in _RAW[(b, p)]:
                try:
                    rec = json.loads(v)
                except ValueError:
                    continue
                if rec["n"] != 0:
                    recs.append(rec)
        good.append(recs)
    ref_ssc, ref_node, _ = _kafka_graph()
    ref = ReferenceRunner(ref_ssc, inputs={ref_node: good})
    ref.run(2)
    (out_id,) = ref.outputs
    assert_batches_equal(out, [recs for _, recs in ref.outputs[out_id]])


def test_undecodable_input_with_fail_on_error() -> None:
    ssc, node_id, _ = _kafka_graph()
    runner = LocalRunner(ssc, source_partitions={node_id: 2}, fail_on_error=True)
    with pytest.raises(UserFunctionError) as ei:
        runner.run_batch(input_blocks=_blocks(node_id, 0))
    msg = str(ei.value)
    assert "source#0.decode" in msg
    assert "topic=events partition=0 offset=101" in msg
    assert "{not json" in msg


def test_msgpack_input_that_is_not_msgpack() -> None:
    ssc = StreamingContext(1.0)
    src = ssc.kafka_stream("events", value_format="msgpack")
    out: list[list[Any]] = []
    src.foreach_batch(lambda _t, recs: out.append(recs))
    runner = LocalRunner(ssc, source_partitions={src.node.id: 1})
    from engine.codec import pack

    block = encode_input_block(
        "events", 0, 7, 10, [pack({"a": 1}), b"\xc1", pack([1, 2])], offsets=[7, 8, 9]
    )
    runner.run_batch(input_blocks={f"in/{src.node.id}/0/0": block})
    assert_batches_equal(out, [[{"a": 1}, [1, 2]]])
    (d,) = runner.sinks.dead
    assert (d.topic, d.partition, d.offset, d.value) == ("events", 0, 8, b"\xc1")


def _reference_letters(batches: list[list[Any]], func: Any) -> tuple[list[list[Any]], list[Any]]:
    """Outputs and ``(operator, record)`` dead letters of the plain-Python reference."""
    ssc = StreamingContext(1.0, num_partitions=1)
    func(ssc.queue_stream(batches)).foreach_batch(lambda t, recs: None)
    ref = ReferenceRunner(ssc)
    ref.run(len(batches))
    ((_, outputs),) = ref.outputs.items()
    return [recs for _, recs in outputs], [(op, rec) for _, op, _, rec in ref.dead_letters]


@pytest.mark.parametrize(
    "func",
    [
        lambda s: s.map(_inverse),
        lambda s: s.filter(lambda x: 1 / x > 0.1).flat_map(lambda x: [x] * (5 // (x - 2))),
        lambda s: s.map(lambda x: (x % 2, x)).map_values(_inverse).reduce_by_key(operator.add),
        lambda s: s.map(lambda x: (x, x)).flat_map_values(lambda v: [1 / v] * 2),
        lambda s: s.transform(lambda rs: sorted(rs) if len(rs) < 3 else 1 / 0),
    ],
)
def test_the_reference_dead_letters_what_the_executor_does(func: Any) -> None:
    """``dstream verify`` compares with the reference: a raising function must not stop it."""
    sinks = LocalSinks()
    got = run_pipeline(BATCHES, func, sinks=sinks, num_partitions=2)
    expected, letters = _reference_letters(BATCHES, func)
    assert_batches_equal(got, expected)
    assert letters, "the case must dead-letter something"
    fleet = sorted((d.operator, json.dumps(json.loads(d.value))) for d in sinks.dead)
    assert fleet == sorted(
        (op, json.dumps(rec if not isinstance(rec, tuple) else list(rec))) for op, rec in letters
    )
