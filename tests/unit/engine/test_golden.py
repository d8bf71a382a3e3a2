"""Golden tests of every DStream operator, in the style of Spark's ``_test_func``.

Each test gives input batches, a pipeline and the expected output batches, written out by
hand. The expectation is checked against the engine (in-process, with several partition
counts) and against the plain-Python reference. A windowed stream emits only at slide
ends: batch ``b`` (counted from 0) emits when ``(b + 1) % slide_batches == 0``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from engine import StreamingContext
from engine.graph import TIMEOUT
from engine.testing import assert_batches_equal, run_pipeline, run_reference

PARTITIONS = (1, 2, 3)


def _test_func(
    batches: Sequence[Sequence[Any]],
    func: Callable[..., Any],
    expected: Sequence[Sequence[Any]],
    *more_inputs: Sequence[Sequence[Any]],
    num_batches: int | None = None,
    batch_interval: float = 1.0,
    ordered: bool = False,
) -> None:
    """Engine (1, 2 and 3 partitions) and reference both give exactly *expected*."""
    ref = run_reference(
        batches, func, *more_inputs, num_batches=num_batches, batch_interval=batch_interval
    )
    assert_batches_equal(ref, expected, ordered=ordered)
    for n in PARTITIONS:
        got = run_pipeline(
            batches,
            func,
            *more_inputs,
            num_batches=num_batches,
            batch_interval=batch_interval,
            num_partitions=n,
        )
        assert_batches_equal(got, expected, ordered=ordered)


def _sorted_values(kv: Any) -> Any:
    return kv[0], sorted(kv[1])


# -- stateless -----------------------------------------------------------------------------
def test_map() -> None:
    _test_func([[1, 2], [3], []], lambda s: s.map(lambda x: x * 10), [[10, 20], [30], []])


def test_map_keeps_order_within_a_partition() -> None:
    _test_func(
        [[3, 1, 2], [5, 4]],
        lambda s: s.map(lambda x: x + 1),
        [[4, 2, 3], [6, 5]],
        ordered=True,
    )


def test_flat_map() -> None:
    _test_func(
        [["a b", "c"], [""], ["d d"]],
        lambda s: s.flat_map(str.split),
        [["a", "b", "c"], [], ["d", "d"]],
    )


def test_filter() -> None:
    _test_func(
        [[1, 2, 3, 4], [5], [6]],
        lambda s: s.filter(lambda x: x % 2 == 0),
        [[2, 4], [], [6]],
    )


def test_map_values() -> None:
    _test_func(
        [[("a", 1), ("b", 2)], [("a", 5)]],
        lambda s: s.map_values(lambda v: v + 1),
        [[("a", 2), ("b", 3)], [("a", 6)]],
    )


def test_flat_map_values() -> None:
    _test_func(
        [[("a", 2), ("b", 0)], [("c", 1)]],
        lambda s: s.flat_map_values(range),
        [[("a", 0), ("a", 1)], [("c", 0)]],
    )


def test_union() -> None:
    _test_func(
        [[1], [2, 3], []],
        lambda s, t: s.union(t),
        [[1, 10], [2, 3], [20]],
        [[10], [], [20]],
    )


def test_union_of_three_then_keyed() -> None:
    _test_func(
        [[("a", 1)], [("b", 1)]],
        lambda s, t, u: s.union(t, u).reduce_by_key(operator.add),
        [[("a", 111)], [("b", 1), ("c", 100)]],
        [[("a", 10)], []],
        [[("a", 100)], [("c", 100)]],
    )


def test_repartition() -> None:
    _test_func(
        [[1, 2, 3, 4, 5], [], [6]],
        lambda s: s.repartition(3),
        [[1, 2, 3, 4, 5], [], [6]],
    )


def test_repartition_then_reduce() -> None:
    _test_func(
        [list(range(10)), [7]],
        lambda s: s.repartition(4).map(lambda x: (x % 2, x)).reduce_by_key(operator.add),
        [[(0, 20), (1, 25)], [(1, 7)]],
    )


def test_count() -> None:
    _test_func([[1, 2, 3], [], ["x"]], lambda s: s.count(), [[3], [0], [1]])


def test_count_of_empty_batch_is_zero() -> None:
    _test_func([[]], lambda s: s.count(), [[0]])
    _test_func([], lambda s: s.count(), [[0], [0]], num_batches=2)


def test_count_by_value() -> None:
    _test_func(
        [["a", "b", "a"], [], ["c", "c", "c"]],
        lambda s: s.count_by_value(),
        [[("a", 2), ("b", 1)], [], [("c", 3)]],
    )


def test_count_by_value_with_num_partitions() -> None:
    _test_func(
        [[1, 2, 1, 3, 1]],
        lambda s: s.count_by_value(num_partitions=5),
        [[(1, 3), (2, 1), (3, 1)]],
    )


def test_reduce() -> None:
    # one record per non-empty batch, none for an empty one
    _test_func([[1, 2, 3], [], [5]], lambda s: s.reduce(operator.add), [[6], [], [5]])


def test_reduce_after_repartition() -> None:
    _test_func([list(range(1, 11))], lambda s: s.repartition(3).reduce(operator.add), [[55]])


def test_reduce_by_key() -> None:
    _test_func(
        [[("a", 1), ("b", 2), ("a", 3)], [], [("b", 1), ("b", 1)]],
        lambda s: s.reduce_by_key(operator.add),
        [[("a", 4), ("b", 2)], [], [("b", 2)]],
    )


@pytest.mark.parametrize("num_partitions", [1, 2, 7])
def test_reduce_by_key_num_partitions(num_partitions: int) -> None:
    _test_func(
        [["a b a", "c a"], ["b"]],
        lambda s: (
            s.flat_map(str.split)
            .map(lambda w: (w, 1))
            .reduce_by_key(operator.add, num_partitions=num_partitions)
        ),
        [[("a", 3), ("b", 1), ("c", 1)], [("b", 1)]],
    )


def test_reduce_by_key_tuple_keys() -> None:
    _test_func(
        [[(("x", 1), 2), (("x", 1), 3), (("y", 2), 1)]],
        lambda s: s.reduce_by_key(operator.add),
        [[(("x", 1), 5), (("y", 2), 1)]],
    )


def test_group_by_key() -> None:
    _test_func(
        [[("a", 1), ("b", 2), ("a", 3)], [], [("c", 0)]],
        lambda s: s.group_by_key().map(_sorted_values),
        [[("a", [1, 3]), ("b", [2])], [], [("c", [0])]],
    )


_LEFT = [[("a", 1), ("b", 2), ("a", 3)], [("d", 4)], []]
_RIGHT = [[("a", "x"), ("c", "y")], [], [("e", "z")]]


def test_join() -> None:
    _test_func(
        _LEFT,
        lambda s, t: s.join(t),
        [[("a", (1, "x")), ("a", (3, "x"))], [], []],
        _RIGHT,
    )


def test_left_outer_join() -> None:
    _test_func(
        _LEFT,
        lambda s, t: s.left_outer_join(t),
        [[("a", (1, "x")), ("a", (3, "x")), ("b", (2, None))], [("d", (4, None))], []],
        _RIGHT,
    )


def test_right_outer_join() -> None:
    _test_func(
        _LEFT,
        lambda s, t: s.right_outer_join(t),
        [[("a", (1, "x")), ("a", (3, "x")), ("c", (None, "y"))], [], [("e", (None, "z"))]],
        _RIGHT,
    )


def test_full_outer_join() -> None:
    _test_func(
        _LEFT,
        lambda s, t: s.full_outer_join(t, num_partitions=3),
        [
            [("a", (1, "x")), ("a", (3, "x")), ("b", (2, None)), ("c", (None, "y"))],
            [("d", (4, None))],
            [("e", (None, "z"))],
        ],
        _RIGHT,
    )


def test_join_many_to_many() -> None:
    _test_func(
        [[("k", 1), ("k", 2)]],
        lambda s, t: s.join(t),
        [[("k", (1, "p")), ("k", (1, "q")), ("k", (2, "p")), ("k", (2, "q"))]],
        [[("k", "p"), ("k", "q")]],
    )


def test_cogroup() -> None:
    def func(s: Any, t: Any) -> Any:
        return s.cogroup(t).map(lambda kv: (kv[0], (sorted(kv[1][0]), sorted(kv[1][1]))))

    _test_func(
        _LEFT,
        func,
        [
            [("a", ([1, 3], ["x"])), ("b", ([2], [])), ("c", ([], ["y"]))],
            [("d", ([4], []))],
            [("e", ([], ["z"]))],
        ],
        _RIGHT,
    )


def test_cogroup_three_streams() -> None:
    def func(s: Any, t: Any, u: Any) -> Any:
        return s.cogroup(t, u, num_partitions=2).map(
            lambda kv: (kv[0], tuple(sorted(g) for g in kv[1]))
        )

    _test_func(
        [[("a", 1)]],
        func,
        [[("a", ([1], [2, 3], [])), ("b", ([], [], [4]))]],
        [[("a", 3), ("a", 2)]],
        [[("b", 4)]],
    )


def test_transform_records() -> None:
    _test_func(
        [[3, 1, 2], [], [9, 8]],
        lambda s: s.transform(lambda records: sorted(records)[:2]),
        [[1, 2], [], [8, 9]],
        ordered=True,
    )


def test_transform_with_batch_time() -> None:
    _test_func(
        [[1, 2], [], [3]],
        lambda s: s.transform(lambda t, records: [(t, len(records))]),
        [[(0, 2)], [(500, 0)], [(1000, 1)]],
        batch_interval=0.5,
    )


def test_transform_sees_the_whole_batch() -> None:
    _test_func(
        [[("a", 1), ("b", 2), ("c", 3)]],
        lambda s: s.reduce_by_key(operator.add, num_partitions=3).transform(
            lambda recs: [sum(v for _, v in recs)]
        ),
        [[6]],
    )


# -- windows -------------------------------------------------------------------------------
def test_window() -> None:
    _test_func(
        [[1], [2], [3], [4], []],
        lambda s: s.window(3, 1),
        [[1], [1, 2], [1, 2, 3], [2, 3, 4], [3, 4], [4], []],
        num_batches=7,
    )


def test_window_with_slide() -> None:
    # window 4 batches, slide 2: emits at batches 1, 3, 5
    _test_func(
        [[1], [2], [3], [4], [5], [6]],
        lambda s: s.window(4, 2),
        [[1, 2], [1, 2, 3, 4], [3, 4, 5, 6]],
    )


def test_window_with_slide_after_a_shuffle() -> None:
    # the same windows, with a task in every batch (the per-batch repartition)
    _test_func(
        [[1], [2], [3], [4], [5], [6]],
        lambda s: s.repartition(2).window(4, 2),
        [[1, 2], [1, 2, 3, 4], [3, 4, 5, 6]],
    )


def test_window_sub_second_interval() -> None:
    _test_func(
        [[1], [2], [3]],
        lambda s: s.window(1.0, 0.5),
        [[1], [1, 2], [2, 3], [3]],
        num_batches=4,
        batch_interval=0.5,
    )


def test_window_then_keyed() -> None:
    _test_func(
        [[("a", 1)], [("a", 2), ("b", 1)], [("b", 1)], []],
        lambda s: s.window(2, 2).reduce_by_key(operator.add),
        [[("a", 3), ("b", 1)], [("b", 1)]],
    )


def test_count_by_window() -> None:
    _test_func(
        [[1], [1, 1], [], [1, 1, 1]],
        lambda s: s.count_by_window(3, 1),
        [[1], [3], [3], [5], [3], [3], [0]],
        num_batches=7,
    )


def test_count_by_window_empty_window_is_zero() -> None:
    # documented: "0 for an empty window", also before any record arrived
    _test_func(
        [[], [], ["x"], []],
        lambda s: s.count_by_window(2, 1),
        [[0], [0], [1], [1], [0]],
        num_batches=5,
    )


def test_count_by_window_with_slide() -> None:
    _test_func(
        [[1], [1, 1], [1], [1, 1, 1], [1]],
        lambda s: s.count_by_window(4, 2),
        [[3], [7], [5]],
        num_batches=6,
    )


def test_reduce_by_window() -> None:
    # without inverse: nothing for an empty window
    _test_func(
        [[1, 2], [3], [], []],
        lambda s: s.reduce_by_window(operator.add, None, 2, 1),
        [[3], [6], [3], []],
    )


def test_reduce_by_window_with_inverse() -> None:
    # with an inverse (Spark): the key stays, an emptied window gives the inverse's zero
    _test_func(
        [[1, 2], [3], [], []],
        lambda s: s.reduce_by_window(operator.add, operator.sub, 2, 1),
        [[3], [6], [3], [0]],
    )


_KV = [[("a", 1), ("b", 2)], [("a", 3)], [], [("b", 5)], [], [], []]


def test_reduce_by_key_and_window() -> None:
    _test_func(
        _KV,
        lambda s: s.reduce_by_key_and_window(operator.add, window=3, slide=1),
        [
            [("a", 1), ("b", 2)],
            [("a", 4), ("b", 2)],
            [("a", 4), ("b", 2)],
            [("a", 3), ("b", 5)],
            [("b", 5)],
            [("b", 5)],
            [],
        ],
    )


def test_reduce_by_key_and_window_with_inverse() -> None:
    # as in Spark: a key whose values all left the window stays, with the inverse's zero
    _test_func(
        _KV,
        lambda s: s.reduce_by_key_and_window(operator.add, operator.sub, 3, 1),
        [
            [("a", 1), ("b", 2)],
            [("a", 4), ("b", 2)],
            [("a", 4), ("b", 2)],
            [("a", 3), ("b", 5)],
            [("a", 0), ("b", 5)],
            [("a", 0), ("b", 5)],
            [("a", 0), ("b", 0)],
        ],
    )


def test_reduce_by_key_and_window_with_inverse_and_filter() -> None:
    _test_func(
        _KV,
        lambda s: s.reduce_by_key_and_window(
            operator.add, operator.sub, 3, 1, filter_fn=lambda kv: kv[1] != 0
        ),
        [
            [("a", 1), ("b", 2)],
            [("a", 4), ("b", 2)],
            [("a", 4), ("b", 2)],
            [("a", 3), ("b", 5)],
            [("b", 5)],
            [("b", 5)],
            [],
        ],
    )


def test_reduce_by_key_and_window_inverse_after_filter_drops_a_key() -> None:
    # Spark's ReducedWindowedDStream: a key missing from the previous window (dropped by
    # filter_fn) is the reduce of its new values only; its old values are not subtracted.
    # window 2, slide 1; keep values > 1
    batches = [[("a", 1)], [("a", 1)], [("a", 5)]]
    _test_func(
        batches,
        lambda s: s.reduce_by_key_and_window(
            operator.add, operator.sub, 2, 1, filter_fn=lambda kv: kv[1] > 1
        ),
        # b0: a=1 dropped; b1: no previous a -> new values only: 1, dropped;
        # b2: no previous a -> 5
        [[], [], [("a", 5)]],
    )


def test_reduce_by_key_and_window_with_slide() -> None:
    # window 4, slide 2: emits at batches 1, 3, 5
    _test_func(
        _KV,
        lambda s: s.reduce_by_key_and_window(operator.add, None, 4, 2),
        [[("a", 4), ("b", 2)], [("a", 4), ("b", 7)], [("b", 5)]],
    )


def test_reduce_by_key_and_window_with_inverse_and_slide() -> None:
    batches = [[("a", 1)], [("a", 2)], [("b", 1)], [("a", 4)], [], [("b", 8)], [], []]
    _test_func(
        batches,
        lambda s: s.reduce_by_key_and_window(operator.add, operator.sub, 6, 2),
        # emits at 1 (0..1), 3 (0..3), 5 (0..5), 7 (2..7)
        [
            [("a", 3)],
            [("a", 7), ("b", 1)],
            [("a", 7), ("b", 9)],
            [("a", 4), ("b", 9)],
        ],
    )


def test_reduce_by_key_and_window_slide_equals_window() -> None:
    batches = [[("a", 1)], [("a", 2)], [("a", 4)], [("b", 1)], [], []]
    for inv in (None, operator.sub):
        _test_func(
            batches,
            lambda s, inv=inv: s.reduce_by_key_and_window(
                operator.add, inv, 2, 2, num_partitions=3
            ),
            [[("a", 3)], [("a", 4), ("b", 1)], [("a", 0), ("b", 0)] if inv else []],
        )


def test_count_by_value_and_window() -> None:
    _test_func(
        [["a", "b"], ["a"], [], ["b"], []],
        lambda s: s.count_by_value_and_window(2, 1),
        # zero counts are dropped
        [[("a", 1), ("b", 1)], [("a", 2), ("b", 1)], [("a", 1)], [("b", 1)], [("b", 1)], []],
        num_batches=6,
    )


def test_count_by_value_and_window_with_slide() -> None:
    _test_func(
        [["a", "b"], ["a"], ["c"], ["b"], [], []],
        lambda s: s.count_by_value_and_window(4, 2, num_partitions=3),
        [[("a", 2), ("b", 1)], [("a", 2), ("b", 2), ("c", 1)], [("b", 1), ("c", 1)]],
    )


# -- state ---------------------------------------------------------------------------------
def test_running_reduce() -> None:
    _test_func(
        [[("a", 1), ("b", 2), ("a", 1)], [("a", 3)], [], [("b", 5), ("c", 1)]],
        lambda s: s.running_reduce(operator.add),
        # the changelog: only keys with values in the batch
        [[("a", 2), ("b", 2)], [("a", 5)], [], [("b", 7), ("c", 1)]],
    )


def test_running_reduce_snapshot() -> None:
    _test_func(
        [[("a", 1), ("b", 2), ("a", 1)], [("a", 3)], [], [("b", 5), ("c", 1)]],
        lambda s: s.running_reduce(operator.add, num_partitions=2).snapshot(),
        [
            [("a", 2), ("b", 2)],
            [("a", 5), ("b", 2)],
            [("a", 5), ("b", 2)],
            [("a", 5), ("b", 7), ("c", 1)],
        ],
    )


def test_running_reduce_over_window() -> None:
    # a stateful stream over a windowed one advances once per slide
    _test_func(
        [[("a", 1)], [("a", 2)], [("a", 4)], [("b", 1)]],
        lambda s: s.window(2, 2).running_reduce(operator.add),
        [[("a", 3)], [("a", 7), ("b", 1)]],
    )


def test_running_reduce_over_window_after_a_shuffle() -> None:
    _test_func(
        [[("a", 1)], [("a", 2)], [("a", 4)], [("b", 1)]],
        lambda s: s.reduce_by_key(operator.add).window(2, 2).running_reduce(operator.add),
        [[("a", 3)], [("a", 7), ("b", 1)]],
    )


def _sum_or_delete(values: list[int], old: int | None) -> int | None:
    """Sum the values; a key without new values is deleted."""
    if not values:
        return None
    return (old or 0) + sum(values)


def test_update_state_by_key() -> None:
    _test_func(
        [[("a", 1), ("b", 2)], [("a", 3)], [], [("b", 5)], []],
        lambda s: s.update_state_by_key(_sum_or_delete),
        [
            [("a", 1), ("b", 2)],
            [("a", 4), ("b", None)],  # b had no values: deleted
            [("a", None)],
            [("b", 5)],  # a fresh state
            [("b", None)],
        ],
    )


def _count_batches(values: list[int], old: int | None) -> int | None:
    """Number of batches with values; deleted once it reaches 3."""
    new = (old or 0) + (1 if values else 0)
    return None if new >= 3 else new


def test_update_state_by_key_unchanged_keys_not_emitted() -> None:
    batches = [[("a", 1), ("b", 1)], [("a", 1)], [], [("a", 1), ("b", 1)], [("b", 0)]]
    func = lambda s: s.update_state_by_key(_count_batches)  # noqa: E731
    _test_func(
        batches,
        func,
        [[("a", 1), ("b", 1)], [("a", 2)], [], [("a", None), ("b", 2)], [("b", None)]],
    )
    _test_func(
        batches,
        lambda s: func(s).snapshot(),
        [[("a", 1), ("b", 1)], [("a", 2), ("b", 1)], [("a", 2), ("b", 1)], [("b", 2)], []],
    )


def test_update_state_by_key_sees_all_values_of_the_batch() -> None:
    _test_func(
        [[("k", 3), ("k", 1), ("k", 2)], [("k", 0)]],
        lambda s: s.update_state_by_key(lambda vs, old: [*(old or []), sorted(vs)]),
        [[("k", [[1, 2, 3]])], [("k", [[1, 2, 3], [0]])]],
    )


def _init(key: str, ev: int) -> int:
    return ev


def _update(key: str, state: int, ev: Any) -> Any:
    if ev is TIMEOUT:
        return f"final:{key}:{state}"
    if ev == 0:
        return None
    return state + ev


_TRACK_IN = [[("a", 1), ("b", 2)], [("a", 3)], [("b", 0)], [], [("b", 5)], [], []]


def test_track() -> None:
    _test_func(
        _TRACK_IN,
        lambda s: s.track(_init, _update, timeout=2),
        [
            [("a", 1), ("b", 2)],
            [("a", 4)],
            [("b", None)],  # update returned None: deleted
            [("a", "final:a:4")],  # a: no events in batches 2 and 3 -> timed out
            [("b", 5)],  # init again after the deletion
            [],
            [("b", "final:b:5")],
        ],
    )


def test_track_snapshot() -> None:
    _test_func(
        _TRACK_IN,
        lambda s: s.track(_init, _update, timeout=2).snapshot(),
        [
            [("a", 1), ("b", 2)],
            [("a", 4), ("b", 2)],
            [("a", 4)],
            [],
            [("b", 5)],
            [("b", 5)],
            [],
        ],
    )


def test_track_without_timeout_keeps_keys() -> None:
    _test_func(
        _TRACK_IN,
        lambda s: s.track(_init, _update).snapshot(),
        [
            [("a", 1), ("b", 2)],
            [("a", 4), ("b", 2)],
            [("a", 4)],
            [("a", 4)],
            [("a", 4), ("b", 5)],
            [("a", 4), ("b", 5)],
            [("a", 4), ("b", 5)],
        ],
    )


def test_track_several_events_per_batch_in_order() -> None:
    _test_func(
        [[("s", "open"), ("s", "click"), ("s", "click")], [("s", "close")], []],
        lambda s: s.track(
            lambda k, ev: [ev],
            lambda k, st, ev: None if ev in ("close", TIMEOUT) else [*st, ev],
            timeout=1,
        ),
        [[("s", ["open", "click", "click"])], [("s", None)], []],
    )


def test_track_timeout_update_returning_none() -> None:
    _test_func(
        [[("a", 1)], [], [("b", 1)], []],
        lambda s: s.track(_init, lambda k, st, ev: None if ev is TIMEOUT else st + ev, timeout=1.5),
        [[("a", 1)], [], [("b", 1)], [("a", None)]],  # a: 3 batches without events
        batch_interval=0.5,
        num_batches=4,
    )


def test_track_timeout_refreshed_by_events() -> None:
    _test_func(
        [[("a", 1)], [], [("a", 1)], [], [], []],
        lambda s: s.track(_init, _update, timeout=2),
        [[("a", 1)], [], [("a", 2)], [], [("a", "final:a:2")], []],
    )


def test_snapshot_needs_a_stateful_stream() -> None:
    ssc = StreamingContext(1.0)
    with pytest.raises(Exception, match="snapshot"):
        ssc.queue_stream([[1]]).map(lambda x: (x, 1)).snapshot()
