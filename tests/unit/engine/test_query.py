"""Queries on live state, engine side: stream names, the checks, selection and merging."""

from __future__ import annotations

import operator

import pytest

from engine import GraphError, StreamingContext
from engine.executor import Executor, StateBlock
from engine.plan import Plan
from engine.query import (
    DEFAULT_LIMIT,
    QueryError,
    check_limit,
    checkpoint_items,
    find_stream,
    key_text,
    merge,
    named_streams,
    read_partition,
    select,
)


def _app() -> StreamingContext:
    ssc = StreamingContext(1.0, num_partitions=2)
    pairs = ssc.queue_stream([[("a", 1)]]).map(lambda x: x)
    pairs.running_reduce(operator.add).name("counts")
    pairs.track(lambda k, e: e, lambda k, s, e: s + e).name("sessions")
    pairs.reduce_by_key_and_window(operator.add, None, 2, 1).name("recent")
    pairs.window(2, 1).name("last")
    pairs.name("pairs").foreach_batch(lambda t, r: None)
    return ssc


def test_name_labels_the_stream_and_returns_it() -> None:
    ssc = StreamingContext(1.0)
    s = ssc.queue_stream([[1]])
    assert s.name("input") is s
    assert s.node.name == "input"
    s.name("input")  # naming a stream again with its own name is fine
    s.name("renamed")
    assert s.node.name == "renamed"


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x#1", "1abc", "a.b", "a" * 101, 3])
def test_a_bad_name_is_refused(bad: object) -> None:
    s = StreamingContext(1.0).queue_stream([[1]])
    with pytest.raises(GraphError, match="stream name is 1-100 letters"):
        s.name(bad)  # type: ignore[arg-type]


def test_names_are_unique() -> None:
    ssc = StreamingContext(1.0)
    a = ssc.queue_stream([[1]]).name("x")
    with pytest.raises(GraphError, match=r"another stream is already named 'x' \(source#0\)"):
        a.map(str).name("x")


def test_find_stream_names_the_streams_when_it_misses() -> None:
    nodes = Plan(_app().nodes, {}).nodes
    assert sorted(named_streams(nodes)) == ["counts", "last", "pairs", "recent", "sessions"]
    assert find_stream(nodes, "counts").kind == "state"
    assert find_stream(nodes, "recent").kind == "window_combine"  # after the plan's split
    with pytest.raises(QueryError, match="named streams: counts, last, pairs, recent") as e:
        find_stream(nodes, "nosuch")
    assert e.value.status == 404
    with pytest.raises(QueryError, match="'pairs' is a map stream and holds no state") as e:
        find_stream(nodes, "pairs")
    assert e.value.status == 400
    assert "recent.reduce" not in named_streams(nodes)  # the plan's own node stays unnamed


def test_check_limit() -> None:
    assert check_limit(None) == DEFAULT_LIMIT
    assert check_limit(5) == 5
    for bad in (0, -1, 10_001, True, "3"):
        with pytest.raises(QueryError, match="limit must be an integer"):
            check_limit(bad)  # type: ignore[arg-type]


def test_key_text_is_the_string_or_compact_json() -> None:
    assert key_text("a b") == "a b"
    assert key_text(42) == "42"
    assert key_text(("a", 1)) == '["a",1]'
    assert key_text(None) == "null"


def test_select_keys_and_scans() -> None:
    items = [("b", 2), ("a", 1), ("ab", 3), (7, 4), (("t", 1), 5)]
    assert select("state", items, ["a", "7", '["t",1]', "zz"]) == (
        [[7, 4], [["t", 1], 5], ["a", 1]],
        False,
    )
    assert select("state", items, prefix="a") == ([["a", 1], ["ab", 3]], False)
    assert select("state", items, prefix="a", limit=1) == ([["a", 1]], True)
    got, more = select("state", items)
    assert [e[0] for e in got] == [7, ["t", 1], "a", "ab", "b"] and not more  # key-text order


def test_select_window_records() -> None:
    recs = [("a", 1), ("a", 2), "loose", ("b", 3)]
    assert select("window", recs, ["a"]) == ([["a", 1], ["a", 2]], False)
    assert select("window", recs, prefix="b") == ([["b", 3]], False)
    assert len(select("window", recs)[0]) == 4  # a full scan has the unkeyed records too


def test_merge_orders_and_cuts_the_partitions_answers() -> None:
    parts = [([["b", 1], ["d", 1]], False), ([["a", 1], ["c", 1]], False)]
    assert merge("state", parts, [], 3) == ([["a", 1], ["b", 1], ["c", 1]], True)
    assert merge("state", parts, [], 10) == ([["a", 1], ["b", 1], ["c", 1], ["d", 1]], False)
    assert merge("state", [([["a", 1]], True)], [], 10)[1]  # a partition cut its scan
    assert merge("state", parts, ["a", "d"], 1)[0] == [["a", 1], ["b", 1], ["c", 1], ["d", 1]]


def test_checkpoint_items_unwrap_track_state() -> None:
    nodes = {n.name: n for n in Plan(_app().nodes, {}).nodes}
    assert checkpoint_items(nodes["sessions"], [["k", [5, 3]], [["t", 1], [1, 2]]]) == [
        ("k", 5),
        (("t", 1), 1),
    ]
    assert checkpoint_items(nodes["counts"], [["k", 5]]) == [("k", 5)]


def test_read_partition_of_state_and_window() -> None:
    plan = Plan(_app().nodes, {})
    nodes = {n.name: n for n in plan.nodes}
    ex = Executor(plan, 0, 1000)
    st = nodes["sessions"]
    blocks = {f"rd/{st.id}/3/1": StateBlock({"k": (9, 3)}, [])}
    assert read_partition(ex, st, 3, 1, lambda bid, _b: blocks[bid]) == [("k", 9)]
    # a window is its input's persisted blocks over the window (here: pairs' blocks)
    from engine.codec import pack

    pairs = nodes["pairs"]
    blocks = {f"rd/{pairs.id}/2/0": pack([("a", 1)]), f"rd/{pairs.id}/3/0": pack([("b", 2)])}
    got = read_partition(ex, nodes["last"], 3, 0, lambda bid, _b: blocks[bid])
    assert sorted(map(list, got)) == [["a", 1], ["b", 2]]


def test_named_windows_keep_their_last_window_until_the_next_completes() -> None:
    def keep(named: bool) -> tuple[int, int, int]:
        ssc = StreamingContext(1.0, num_partitions=1)
        pairs = ssc.queue_stream([[("a", 1)]]).map(lambda x: x)
        w = pairs.window(3, 2)
        r = pairs.reduce_by_key_and_window(operator.add, None, 4, 2)
        if named:
            w.name("w")
            r.name("r")
        w.foreach_batch(lambda t, x: None)
        r.foreach_batch(lambda t, x: None)
        plan = Plan(ssc.nodes, {})
        return plan.keep[pairs.node.id], plan.keep[w.node.id], plan.keep[r.node.id]

    assert keep(False) == (2, 0, 0)
    # the window at b reads pairs' blocks b-2..b: they stay until b+2 completes (the next
    # window), and so do the window's own blocks
    assert keep(True) == (4, 2, 2)
    plan_named = Plan(_app().nodes, {})
    counts = next(n for n in plan_named.nodes if n.name == "counts")
    assert plan_named.keep[counts.id] == 1  # state[t] stays until t+1 completes (as before)
