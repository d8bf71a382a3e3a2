"""Invalid graphs fail when they are built, with messages that name the offending values."""

from __future__ import annotations

import operator
import re

import pytest

from engine import StreamingContext
from engine.errors import DStreamError, GraphError
from engine.local import LocalRunner


def _ctx(batch: float = 1.0) -> StreamingContext:
    return StreamingContext(batch)


def test_graph_error_is_a_dstream_error() -> None:
    assert issubclass(GraphError, DStreamError)


def test_window_not_a_multiple_of_the_batch_interval() -> None:
    s = _ctx(2.0).queue_stream([[1]])
    with pytest.raises(GraphError) as ei:
        s.window(7)
    msg = str(ei.value)
    assert "window=7s" in msg
    assert "batch=2s" in msg
    assert msg.startswith("window:")


def test_slide_not_a_multiple_of_the_batch_interval() -> None:
    s = _ctx(2.0).queue_stream([[1]])
    with pytest.raises(GraphError, match=r"slide=3s.*batch=2s"):
        s.window(6, 3)


@pytest.mark.parametrize(
    "build",
    [
        lambda s: s.reduce_by_key_and_window(operator.add, None, 5),
        lambda s: s.reduce_by_key_and_window(operator.add, operator.sub, 5),
        lambda s: s.count_by_window(5),
        lambda s: s.count_by_value_and_window(5),
        lambda s: s.reduce_by_window(operator.add, None, 5),
    ],
)
def test_every_windowed_operator_checks_its_window(build: object) -> None:
    s = _ctx(2.0).queue_stream([[1]])
    with pytest.raises(GraphError, match=r"window=5s.*batch=2s"):
        build(s)  # type: ignore[operator]


def test_window_must_be_positive() -> None:
    s = _ctx().queue_stream([[1]])
    with pytest.raises(GraphError, match="positive"):
        s.window(0)
    with pytest.raises(GraphError, match="-2"):
        s.window(-2)


def test_slide_longer_than_window() -> None:
    s = _ctx().queue_stream([[1]])
    with pytest.raises(GraphError) as ei:
        s.window(2, 4)
    msg = str(ei.value)
    assert "slide" in msg
    assert "window=2s" in msg
    assert "slide=4s" in msg
    with pytest.raises(GraphError, match=r"window=2s.*slide=3s"):
        s.reduce_by_key_and_window(operator.add, operator.sub, 2, 3)


def test_track_timeout_not_a_multiple() -> None:
    s = _ctx(2.0).queue_stream([[1]])
    with pytest.raises(GraphError, match=r"timeout=3s.*batch=2s"):
        s.track(lambda k, e: e, lambda k, st, e: st, timeout=3)


@pytest.mark.parametrize(
    ("op", "build"),
    [
        ("map", lambda s: s.map(3)),
        ("flat_map", lambda s: s.flat_map("x")),
        ("filter", lambda s: s.filter(None)),
        ("map_values", lambda s: s.map_values(1.5)),
        ("flat_map_values", lambda s: s.flat_map_values([1])),
        ("reduce", lambda s: s.reduce(0)),
        ("reduce_by_key", lambda s: s.reduce_by_key("add")),
        ("transform", lambda s: s.transform(7)),
        ("reduce_by_key_and_window", lambda s: s.reduce_by_key_and_window(operator.add, 5, 2)),
        ("running_reduce", lambda s: s.running_reduce(42)),
        ("update_state_by_key", lambda s: s.update_state_by_key(42)),
        ("track", lambda s: s.track(42, lambda k, st, e: st)),
        ("track", lambda s: s.track(lambda k, e: e, 42)),
        ("foreach_batch", lambda s: s.foreach_batch(42)),
    ],
)
def test_non_callable_function(op: str, build: object) -> None:
    s = _ctx().queue_stream([[1]])
    with pytest.raises(GraphError) as ei:
        build(s)  # type: ignore[operator]
    msg = str(ei.value)
    assert msg.startswith(f"{op}:")
    assert "callable" in msg


def test_map_3_names_the_value() -> None:
    s = _ctx().queue_stream([[1]])
    with pytest.raises(GraphError, match=r"map: fn must be callable, got int 3"):
        s.map(3)


def test_graph_without_output() -> None:
    ssc = _ctx()
    ssc.queue_stream([[1]]).map(lambda x: x)
    with pytest.raises(GraphError, match="no output"):
        ssc.validate()
    with pytest.raises(GraphError, match="no output"):
        LocalRunner(ssc)


def test_graph_without_input() -> None:
    with pytest.raises(GraphError, match="no input"):
        _ctx().validate()


def test_valid_graph_validates() -> None:
    ssc = _ctx()
    ssc.queue_stream([[1]]).pprint()
    ssc.validate()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
@pytest.mark.parametrize(
    "build",
    [
        lambda s, n: s.reduce_by_key(operator.add, num_partitions=n),
        lambda s, n: s.repartition(n),
        lambda s, n: s.group_by_key(num_partitions=n),
        lambda s, n: s.join(s, num_partitions=n),
        lambda s, n: s.cogroup(s, num_partitions=n),
        lambda s, n: s.count_by_value(num_partitions=n),
        lambda s, n: s.reduce_by_key_and_window(operator.add, None, 2, num_partitions=n),
        lambda s, n: s.running_reduce(operator.add, num_partitions=n),
        lambda s, n: s.track(lambda k, e: e, lambda k, st, e: st, num_partitions=n),
    ],
)
def test_invalid_num_partitions(bad: object, build: object) -> None:
    s = _ctx().queue_stream([[1]])
    with pytest.raises(GraphError) as ei:
        build(s, bad)  # type: ignore[operator]
    msg = str(ei.value)
    assert "num_partitions must be a positive int" in msg
    assert msg.endswith(f"got {bad!r}")


def test_repartition_needs_a_count() -> None:
    s = _ctx().queue_stream([[1]])
    with pytest.raises(GraphError, match="got None"):
        s.repartition(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3, 2.0])
def test_invalid_context_num_partitions(bad: object) -> None:
    with pytest.raises(GraphError, match=re.escape(repr(bad))):
        StreamingContext(1.0, num_partitions=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 0.001, 4000])
def test_invalid_batch_interval(bad: float) -> None:
    with pytest.raises(GraphError, match=re.escape(str(bad))):
        StreamingContext(bad)


def test_unknown_value_format() -> None:
    with pytest.raises(GraphError) as ei:
        _ctx().kafka_stream("events", value_format="avro")
    msg = str(ei.value)
    assert "'avro'" in msg
    for fmt in ("json", "msgpack", "raw"):
        assert fmt in msg


def test_kafka_stream_bad_topics_and_start() -> None:
    ssc = _ctx()
    with pytest.raises(GraphError, match="topics"):
        ssc.kafka_stream([])
    with pytest.raises(GraphError, match="'middle'"):
        ssc.kafka_stream("t", start="middle")


def test_union_of_streams_with_different_slides() -> None:
    ssc = _ctx()
    a = ssc.queue_stream([[1]]).window(4, 2)
    b = ssc.queue_stream([[1]])
    with pytest.raises(GraphError) as ei:
        a.union(b)
    msg = str(ei.value)
    assert "union" in msg
    assert "2s" in msg
    assert "1s" in msg
    assert "slide" in msg


def test_join_and_cogroup_of_streams_with_different_slides() -> None:
    ssc = _ctx()
    a = ssc.queue_stream([[("k", 1)]]).window(3, 3)
    b = ssc.queue_stream([[("k", 1)]]).reduce_by_key_and_window(operator.add, None, 2, 2)
    with pytest.raises(GraphError, match=r"join.*3s.*2s"):
        a.join(b)
    with pytest.raises(GraphError, match=r"cogroup.*3s.*2s"):
        a.cogroup(b)


def test_union_of_streams_with_equal_slides_is_fine() -> None:
    ssc = _ctx()
    a = ssc.queue_stream([[1]]).window(4, 2)
    b = ssc.queue_stream([[2]]).window(2, 2)
    a.union(b).pprint()
    ssc.validate()


def test_window_over_a_windowed_stream_must_use_its_slide() -> None:
    ssc = _ctx()
    w = ssc.queue_stream([[1]]).window(4, 2)
    with pytest.raises(GraphError, match=r"window=3s.*slide=3s.*2s"):
        w.window(3, 3)
    w.window(6, 4).pprint()  # multiples of the input's 2 s slide


def test_snapshot_of_a_stateless_stream() -> None:
    with pytest.raises(GraphError, match=r"snapshot.*map"):
        _ctx().queue_stream([[1]]).map(lambda x: x).snapshot()


def test_union_and_cogroup_need_another_stream() -> None:
    s = _ctx().queue_stream([[1]])
    with pytest.raises(GraphError, match="union"):
        s.union()
    with pytest.raises(GraphError, match="cogroup"):
        s.cogroup()


def test_streams_of_different_contexts() -> None:
    a = _ctx().queue_stream([[1]])
    b = _ctx().queue_stream([[1]])
    with pytest.raises(GraphError, match="different StreamingContexts"):
        a.union(b)


def test_output_arguments() -> None:
    s = _ctx().queue_stream([[1]])
    with pytest.raises(GraphError, match="'avro'"):
        s.to_kafka("out", format="avro")
    with pytest.raises(GraphError, match="topic"):
        s.to_kafka("")
    with pytest.raises(GraphError, match="'list'"):
        s.to_redis(mode="list")
    with pytest.raises(GraphError, match="hash_name"):
        s.to_redis(mode="hash")
