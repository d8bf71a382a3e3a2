"""Property tests: on random streams, the engine equals the plain-Python reference.

Random batches of small keys and values, random partition counts, batch counts, windows
and slides. Reduce functions are associative and commutative (``operator.add`` on ints),
as Spark requires; group values are compared order-insensitively.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.graph import TIMEOUT
from engine.testing import assert_batches_equal, run_pipeline, run_reference

SETTINGS = settings(max_examples=60, deadline=None, database=None)

keys = st.sampled_from(["a", "b", "c", "d", "e"])
values = st.integers(min_value=-3, max_value=5)
pairs = st.tuples(keys, values)
batch = st.lists(pairs, max_size=8)
streams = st.lists(batch, max_size=7)
partitions = st.integers(min_value=1, max_value=4)
extra_batches = st.integers(min_value=0, max_value=4)


def _check(
    func: Callable[..., Any],
    inputs: list[list[list[Any]]],
    num_partitions: int,
    extra: int,
) -> None:
    """Engine equals reference over ``max(len(inputs)) + extra`` batches."""
    n = max(len(i) for i in inputs) + extra
    if n == 0:
        n = 1
    got = run_pipeline(inputs[0], func, *inputs[1:], num_batches=n, num_partitions=num_partitions)
    ref = run_reference(inputs[0], func, *inputs[1:], num_batches=n)
    assert_batches_equal(got, ref)


def _sorted_groups(kv: Any) -> Any:
    key, groups = kv
    return key, tuple(sorted(g) for g in groups)


# -- stateless -----------------------------------------------------------------------------
@SETTINGS
@given(streams, partitions, extra_batches)
def test_map_reduce_by_key(batches: Any, n: int, extra: int) -> None:
    _check(
        lambda s: (
            s.map(lambda kv: (kv[0], kv[1] * 2))
            .filter(lambda kv: kv[1] != 4)
            .reduce_by_key(operator.add)
        ),
        [batches],
        n,
        extra,
    )


@SETTINGS
@given(streams, partitions, st.integers(min_value=1, max_value=5))
def test_count_by_value_after_repartition(batches: Any, n: int, r: int) -> None:
    _check(lambda s: s.map(lambda kv: kv[0]).repartition(r).count_by_value(), [batches], n, 0)


@SETTINGS
@given(streams, partitions)
def test_group_by_key(batches: Any, n: int) -> None:
    _check(
        lambda s: s.group_by_key().map(lambda kv: (kv[0], sorted(kv[1]))),
        [batches],
        n,
        0,
    )


@SETTINGS
@given(
    streams,
    streams,
    partitions,
    extra_batches,
    st.sampled_from(["join", "left_outer_join", "right_outer_join", "full_outer_join"]),
)
def test_joins(left: Any, right: Any, n: int, extra: int, how: str) -> None:
    _check(lambda s, t: getattr(s, how)(t), [left, right], n, extra)


@SETTINGS
@given(streams, streams, streams, partitions)
def test_cogroup(a: Any, b: Any, c: Any, n: int) -> None:
    _check(lambda s, t, u: s.cogroup(t, u).map(_sorted_groups), [a, b, c], n, 0)
    _check(lambda s, t: s.cogroup(t).map(_sorted_groups), [a, b], n, 1)


# -- windows -------------------------------------------------------------------------------
windows = st.integers(min_value=1, max_value=5).flatmap(
    lambda w: st.tuples(st.just(w), st.integers(min_value=1, max_value=w))
)


@SETTINGS
@given(streams, partitions, extra_batches, windows, st.booleans())
def test_reduce_by_key_and_window(
    batches: Any, n: int, extra: int, ws: tuple[int, int], inverse: bool
) -> None:
    w, s = ws
    inv = operator.sub if inverse else None
    _check(
        lambda x: x.reduce_by_key_and_window(operator.add, inv, w, s),
        [batches],
        n,
        extra + w,
    )


@SETTINGS
@given(streams, partitions, extra_batches, windows)
def test_reduce_by_key_and_window_with_inverse_and_filter(
    batches: Any, n: int, extra: int, ws: tuple[int, int]
) -> None:
    w, s = ws
    _check(
        lambda x: x.reduce_by_key_and_window(
            operator.add, operator.sub, w, s, filter_fn=lambda kv: kv[1] > 0
        ),
        [batches],
        n,
        extra + w,
    )


@SETTINGS
@given(streams, partitions, extra_batches, windows)
def test_count_windows(batches: Any, n: int, extra: int, ws: tuple[int, int]) -> None:
    w, s = ws
    _check(lambda x: x.count_by_window(w, s), [batches], n, extra + w)
    _check(lambda x: x.map(lambda kv: kv[0]).count_by_value_and_window(w, s), [batches], n, extra)


# -- state ---------------------------------------------------------------------------------
@SETTINGS
@given(streams, partitions, extra_batches, st.booleans())
def test_running_reduce(batches: Any, n: int, extra: int, snapshot: bool) -> None:
    def func(s: Any) -> Any:
        out = s.running_reduce(operator.add)
        return out.snapshot() if snapshot else out

    _check(func, [batches], n, extra)


def _update_state(vals: list[int], old: int | None) -> int | None:
    total = (old or 0) + sum(vals)
    if total < 0:
        return None  # delete
    return total if vals or total % 2 else total - 1


@SETTINGS
@given(streams, partitions, extra_batches, st.booleans())
def test_update_state_by_key(batches: Any, n: int, extra: int, snapshot: bool) -> None:
    def func(s: Any) -> Any:
        out = s.update_state_by_key(_update_state)
        return out.snapshot() if snapshot else out

    _check(func, [batches], n, extra)


def _track_update(key: str, state: Any, ev: Any) -> Any:
    if ev is TIMEOUT:
        return None if state[0] % 2 else [state[0], "timed out"]
    if ev == 0:
        return None
    return [state[0] + ev, state[1] + 1]


@SETTINGS
@given(streams, partitions, extra_batches, st.sampled_from([None, 1, 2, 3]), st.booleans())
def test_track_with_timeouts(
    batches: Any, n: int, extra: int, timeout: int | None, snapshot: bool
) -> None:
    def func(s: Any) -> Any:
        out = s.track(lambda k, ev: [ev, 1], _track_update, timeout=timeout)
        return out.snapshot() if snapshot else out

    _check(func, [batches], n, extra + (timeout or 0))


@SETTINGS
@given(streams, streams, partitions, extra_batches)
def test_state_over_a_union_and_window(a: Any, b: Any, n: int, extra: int) -> None:
    _check(
        lambda s, t: (
            s.union(t)
            .reduce_by_key_and_window(operator.add, operator.sub, 2, 1)
            .running_reduce(operator.add)
        ),
        [a, b],
        n,
        extra,
    )
