"""Planner unit tests: fused narrow ops, stable partitioning, state and window lineage,
pipelining across batches, block retention.
"""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import DStream, StreamingContext
from engine.codec import stable_hash
from engine.plan import Plan, ShuffleInputs, TaskSpec, block_batch

ROOT = Path(__file__).resolve().parents[3]


def _plan(
    build: Callable[[StreamingContext], DStream | None],
    num_partitions: int = 3,
    source_partitions: int | None = None,
) -> tuple[Plan, StreamingContext]:
    ssc = StreamingContext(1.0, num_partitions=num_partitions)
    out = build(ssc)
    if out is not None:
        out.foreach_batch(lambda _t, _r: None)
    parts = {n.id: source_partitions for n in ssc.nodes if n.kind == "source"}
    return Plan(ssc.nodes, parts if source_partitions else {}), ssc


def _kafka(ssc: StreamingContext) -> DStream:
    return ssc.kafka_stream("events")


def _input_batches(t: TaskSpec) -> set[int]:
    return {block_batch(bid) for bid, _ in t.inputs}


# -- fusion --------------------------------------------------------------------------------
def test_narrow_ops_are_fused_into_map_and_reduce_sides() -> None:
    def build(ssc: StreamingContext) -> DStream:
        return (
            _kafka(ssc)
            .map(lambda x: (x, 1))
            .filter(lambda kv: kv[0] != "")
            .map_values(lambda v: v * 2)
            .reduce_by_key(operator.add)
        )

    plan, ssc = _plan(build, num_partitions=3, source_partitions=4)
    src, m, f, mv, red, out = ssc.nodes
    tasks = plan.tasks_for_batch(7, 0)
    kinds = sorted({(t.kind, t.node) for t in tasks})
    assert kinds == [("map", red.id), ("output", out.id), ("result", red.id)]
    assert not [t for t in tasks if t.node in (m.id, f.id, mv.id)]
    maps = [t for t in tasks if t.kind == "map"]
    results = [t for t in tasks if t.kind == "result"]
    # one map task per source partition, reading its input block directly
    assert [t.inputs for t in maps] == [((f"in/{src.id}/7/{p}", -1),) for p in range(4)]
    assert [t.id for t in maps] == [f"sh/{red.id}/0/7/{p}" for p in range(4)]
    # one reduce task per reduce partition, reading its bucket of every map output
    assert len(results) == 3
    for r in results:
        assert r.inputs == tuple((f"sh/{red.id}/0/7/{m}", r.part) for m in range(4))
    assert {n.id for n in (m, f, mv)}.isdisjoint(plan.boundary)


def test_a_stream_with_two_consumers_is_persisted_once() -> None:
    def build(ssc: StreamingContext) -> DStream:
        mapped = _kafka(ssc).map(lambda x: (x, 1))
        return mapped.union(mapped.map_values(lambda v: -v))

    plan, ssc = _plan(build, source_partitions=2)
    mapped = ssc.nodes[1]
    assert mapped.id in plan.boundary
    tasks = plan.tasks_for_batch(0, 0)
    persisted = [t for t in tasks if t.node == mapped.id]
    assert [t.id for t in persisted] == [f"rd/{mapped.id}/0/0", f"rd/{mapped.id}/0/1"]
    (out,) = [t for t in tasks if t.kind == "output"]
    # the union reads the persisted block twice (once per branch), never the input
    assert sorted(bid for bid, _ in out.inputs) == sorted(
        [f"rd/{mapped.id}/0/0", f"rd/{mapped.id}/0/1"] * 2
    )


def test_union_partitions_concatenate() -> None:
    def build(ssc: StreamingContext) -> DStream:
        a = _kafka(ssc)
        b = ssc.kafka_stream("other")
        return a.union(b).map(lambda x: x)

    plan, ssc = _plan(build, source_partitions=2)
    assert plan.nparts[ssc.nodes[2].id] == 4


def test_join_has_a_map_stage_per_side() -> None:
    def build(ssc: StreamingContext) -> DStream:
        a = _kafka(ssc).map(lambda x: (x, 1))
        b = ssc.kafka_stream("other").map(lambda x: (x, 2))
        return a.join(b, num_partitions=2)

    plan, ssc = _plan(build, source_partitions=3)
    join = next(n for n in ssc.nodes if n.kind == "join")
    tasks = plan.tasks_for_batch(1, 0)
    assert sorted({t.stage for t in tasks if t.kind == "map"}) == [
        f"map:{join.id}:0",
        f"map:{join.id}:1",
    ]
    for r in (t for t in tasks if t.node == join.id and t.kind == "result"):
        assert len(r.inputs) == 6
        assert {bid.split("/")[2] for bid, _ in r.inputs} == {"0", "1"}


# -- stable hashing ------------------------------------------------------------------------
_KEYS: list[Any] = [
    "user-1",
    "",
    "ünïcode",
    0,
    1,
    -7,
    2**40,
    1.5,
    True,
    None,
    b"\x00bytes",
    ("a", 1),
    ("nested", ("t", 2)),
]


def _partitions(keys: list[Any], n: int) -> list[int]:
    return [stable_hash(k) % n for k in keys]


def test_stable_hash_is_the_same_in_another_process() -> None:
    code = (
        "import json, sys\n"
        "from engine.codec import stable_hash\n"
        "from tests.unit.engine.test_plan import _KEYS\n"
        "print(json.dumps([stable_hash(k) for k in _KEYS]))\n"
    )
    here = [stable_hash(k) for k in _KEYS]
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert json.loads(res.stdout) == here, f"PYTHONHASHSEED={seed}"


def test_stable_hash_values_are_pinned() -> None:
    # partition placement is part of state checkpoints: it must never change silently
    # (crc32 of the UTF-8 bytes of a str, of the msgpack form of anything else)
    assert stable_hash("user-1") == 2116437524
    assert stable_hash(("a", 1)) == 3847662356
    assert stable_hash(0) == 3523407757
    assert _partitions(["a", "b", "c", "d"], 4) == [s % 4 for s in map(stable_hash, "abcd")]


def test_stable_hash_spreads_keys() -> None:
    n = 8
    counts = [0] * n
    for p in _partitions([f"key-{i}" for i in range(8000)], n):
        counts[p] += 1
    assert min(counts) > 800


def test_equal_keys_after_a_round_trip_hash_alike() -> None:
    # a tuple key and the list it may become in a user function land in the same partition
    assert stable_hash(("a", 1)) == stable_hash(["a", 1])


# -- state lineage -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stateful",
    [
        lambda s: s.running_reduce(operator.add),
        lambda s: s.update_state_by_key(lambda vs, old: (old or 0) + len(vs)),
        lambda s: s.track(lambda k, e: e, lambda k, st, e: st, timeout=3),
    ],
)
def test_state_tasks_read_the_previous_state(stateful: Callable[[DStream], DStream]) -> None:
    plan, ssc = _plan(lambda c: stateful(_kafka(c).map(lambda x: (x, 1))), source_partitions=2)
    state = next(n for n in ssc.nodes if n.kind == "state")
    first = 10
    for b in (first, first + 1, first + 5):
        results = [t for t in plan.tasks_for_batch(b, first) if t.node == state.id]
        results = [t for t in results if t.kind == "result"]
        assert [t.part for t in results] == [0, 1, 2]
        for t in results:
            prev = [bid for bid, _ in t.inputs if bid.startswith("rd/")]
            if b == first:  # the first batch starts from empty state
                assert prev == []
            else:
                assert prev == [f"rd/{state.id}/{b - 1}/{t.part}"]
    assert plan.keep[state.id] == 1
    assert state in plan.stateful_nodes()


def test_state_over_a_window_chains_by_the_slide() -> None:
    plan, ssc = _plan(
        lambda c: _kafka(c).map(lambda x: (x, 1)).window(4, 2).running_reduce(operator.add),
        source_partitions=1,
    )
    state = next(n for n in ssc.nodes if n.kind == "state")
    assert not [t for t in plan.tasks_for_batch(4, 0) if t.node == state.id]
    results = [t for t in plan.tasks_for_batch(5, 0) if t.node == state.id]
    results = [t for t in results if t.kind == "result"]
    assert all((f"rd/{state.id}/3/{t.part}", -1) in t.inputs for t in results)
    assert plan.keep[state.id] == 2


def test_snapshot_reads_the_state_block() -> None:
    plan, ssc = _plan(
        lambda c: _kafka(c).map(lambda x: (x, 1)).running_reduce(operator.add).snapshot(),
        source_partitions=1,
    )
    state = next(n for n in ssc.nodes if n.kind == "state")
    (out,) = [t for t in plan.tasks_for_batch(3, 0) if t.kind == "output"]
    assert out.inputs == tuple((f"rd/{state.id}/3/{p}", -1) for p in range(3))


# -- windows -------------------------------------------------------------------------------
def _window_reduce(inv: bool, w: int, s: int) -> tuple[Plan, int, int]:
    plan, _ssc = _plan(
        lambda c: (
            _kafka(c)
            .map(lambda x: (x, 1))
            .reduce_by_key_and_window(operator.add, operator.sub if inv else None, w, s)
        ),
        num_partitions=2,
        source_partitions=1,
    )
    combine = next(n for n in plan.nodes if n.kind == "window_combine")
    red = combine.parents[0]
    assert red.kind == "reduce_by_key"
    return plan, combine.id, red.id


@pytest.mark.parametrize(("w", "s"), [(3, 1), (4, 2), (6, 3), (2, 2)])
def test_window_combine_with_inverse_reads_previous_window_new_and_old_slices(
    w: int, s: int
) -> None:
    plan, comb, red = _window_reduce(True, w, s)
    b = 4 * w * s - 1  # a slide end, well past the first batch
    assert plan.emits(comb, b)
    for p in range(2):
        (t,) = [
            t
            for t in plan.tasks_for_batch(b, 0)
            if t.node == comb and t.part == p and t.kind == "result"
        ]
        ids = [bid for bid, _ in t.inputs]
        new = [f"rd/{red}/{x}/{p}" for x in range(b - s + 1, b + 1)]
        old = [f"rd/{red}/{x}/{p}" for x in range(b - s - w + 1, b - w + 1)]
        assert ids == [f"rd/{comb}/{b - s}/{p}", *new, *old]
    # the per-batch reduce runs every batch; the combination only at slide ends
    assert [x for x in range(2 * s) if plan.emits(comb, x)] == [s - 1, 2 * s - 1]
    assert all(plan.emits(red, x) for x in range(2 * s))
    # retention: slices back to the one that leaves next; the previous window for a slide
    assert plan.keep[red] == w - 1 + s
    assert plan.keep[comb] == s
    assert comb in {n.id for n in plan.stateful_nodes()}


def test_window_combine_with_inverse_near_the_first_batch() -> None:
    plan, comb, red = _window_reduce(True, 3, 1)
    first = 5
    (t,) = [t for t in plan.tasks_for_batch(first, first) if t.node == comb and t.part == 0]
    assert [bid for bid, _ in t.inputs] == [f"rd/{red}/{first}/0"]  # no previous, no old
    (t,) = [t for t in plan.tasks_for_batch(first + 3, first) if t.node == comb and t.part == 0]
    assert [bid for bid, _ in t.inputs] == [
        f"rd/{comb}/{first + 2}/0",
        f"rd/{red}/{first + 3}/0",
        f"rd/{red}/{first}/0",
    ]


@pytest.mark.parametrize(("w", "s"), [(3, 1), (4, 2)])
def test_window_combine_without_inverse_reads_the_whole_window(w: int, s: int) -> None:
    plan, comb, red = _window_reduce(False, w, s)
    b = 10 * s - 1
    (t,) = [t for t in plan.tasks_for_batch(b, 0) if t.node == comb and t.part == 1]
    assert [bid for bid, _ in t.inputs] == [f"rd/{red}/{x}/1" for x in range(b - w + 1, b + 1)]
    assert plan.keep[red] == w - 1
    assert comb not in {n.id for n in plan.stateful_nodes()}


def test_window_over_a_source_reads_its_input_blocks() -> None:
    plan, ssc = _plan(lambda c: _kafka(c).window(3, 1), source_partitions=2)
    src = ssc.nodes[0]
    (out,) = [t for t in plan.tasks_for_batch(5, 0) if t.kind == "output"]
    assert sorted(bid for bid, _ in out.inputs) == sorted(
        f"in/{src.id}/{x}/{p}" for x in (3, 4, 5) for p in range(2)
    )
    assert plan.keep[src.id] == 2


# -- pipelining ----------------------------------------------------------------------------
def test_stateless_batches_do_not_depend_on_each_other() -> None:
    def build(ssc: StreamingContext) -> DStream:
        kv = _kafka(ssc).flat_map(str.split).map(lambda w: (w, 1))
        return kv.reduce_by_key(operator.add).join(kv.group_by_key()).map(lambda x: x)

    plan, _ = _plan(build, source_partitions=3)
    for b in (0, 1, 7):
        for t in plan.tasks_for_batch(b, 0):
            assert _input_batches(t) <= {b}, t


def test_only_state_tasks_read_the_previous_batch() -> None:
    def build(ssc: StreamingContext) -> DStream:
        return _kafka(ssc).map(lambda x: (x, 1)).running_reduce(operator.add).map(lambda x: x)

    plan, ssc = _plan(build, source_partitions=2)
    state = next(n for n in ssc.nodes if n.kind == "state")
    b = 8
    for t in plan.tasks_for_batch(b, 0):
        if t.kind == "result" and t.node == state.id:
            assert _input_batches(t) == {b - 1, b}
        else:  # map side and output start as soon as batch b's input is sealed
            assert _input_batches(t) == {b}, t


def test_window_tasks_read_only_their_window() -> None:
    plan, comb, _red = _window_reduce(True, 4, 2)
    b = 21
    for t in plan.tasks_for_batch(b, 0):
        if t.node == comb and t.kind == "result":
            assert _input_batches(t) <= set(range(b - 4 - 2 + 1, b + 1))
        else:
            assert _input_batches(t) <= {b}


# -- planning is deterministic -------------------------------------------------------------
def test_same_graph_same_tasks() -> None:
    def build(ssc: StreamingContext) -> DStream:
        kv = _kafka(ssc).map(lambda x: (x, 1))
        return kv.reduce_by_key_and_window(operator.add, operator.sub, 4, 2).cogroup(
            kv.running_reduce(operator.add).window(2, 2)
        )

    a, _ = _plan(build, source_partitions=3)
    b, _ = _plan(build, source_partitions=3)
    for batch in range(12):
        assert a.tasks_for_batch(batch, 2) == b.tasks_for_batch(batch, 2)


def test_tasks_come_after_the_tasks_they_read() -> None:
    def build(ssc: StreamingContext) -> DStream:
        kv = _kafka(ssc).map(lambda x: (x, 1))
        return (
            kv.reduce_by_key_and_window(operator.add, operator.sub, 4, 2)
            .running_reduce(operator.add)
            .snapshot()
            .transform(sorted)
        )

    plan, _ = _plan(build, source_partitions=2)
    for b in range(8):
        seen: set[str] = set()
        for t in plan.tasks_for_batch(b, 0):
            for bid, _ in t.inputs:
                if block_batch(bid) == b and not bid.startswith("in/"):
                    assert bid in seen, (t.id, bid)
            seen.add(t.id)


def test_freeable() -> None:
    plan, _comb, red = _window_reduce(True, 4, 2)
    # a reduced slice of batch 10 is read until batch 10 + keep
    keep = plan.keep[red]
    assert not plan.freeable(f"rd/{red}/10/0", 10 + keep - 1)
    assert plan.freeable(f"rd/{red}/10/0", 10 + keep)
    # shuffle outputs are read only within their batch
    assert not plan.freeable(f"sh/{red}/0/10/0", 9)
    assert plan.freeable(f"sh/{red}/0/10/0", 10)


# -- reduces named by map stage; one task re-planned alone -----------------------------------
def test_a_reduce_names_its_map_stages_and_reads_every_map_output() -> None:
    plan, ssc = _plan(
        lambda c: _kafka(c).map(lambda x: (x, 1)).update_state_by_key(lambda vs, s: s),
        num_partitions=3,
        source_partitions=4,
    )
    state = next(n for n in ssc.nodes if n.kind == "state")
    r = next(t for t in plan.tasks_for_batch(5, 0) if t.id == f"rd/{state.id}/5/2")
    assert isinstance(r.inputs, ShuffleInputs)
    assert r.inputs.stages == ((f"sh/{state.id}/0/5", 4),)
    expanded = (*((f"sh/{state.id}/0/5/{m}", 2) for m in range(4)), (f"rd/{state.id}/4/2", -1))
    assert tuple(r.inputs) == expanded
    assert r.inputs == expanded and expanded == tuple(r.inputs)
    assert len(r.inputs) == 5
    assert [r.inputs[i] for i in range(-5, 5)] == [*expanded, *expanded]
    assert r.inputs[1:3] == expanded[1:3]
    with pytest.raises(IndexError):
        r.inputs[5]
    assert r.inputs != expanded[:4]
    other = ShuffleInputs(r.inputs.stages, 2, r.inputs.others)
    assert other == r.inputs and hash(other) == hash(r.inputs)
    assert ShuffleInputs(r.inputs.stages, 1, r.inputs.others) != r.inputs


def _graphs() -> list[tuple[Plan, int]]:
    def joined(c: StreamingContext) -> DStream:
        a = _kafka(c).map(lambda x: (x, 1))
        b = c.kafka_stream("other").map(lambda x: (x, 2))
        return a.join(b, num_partitions=2).union(a)

    def table(c: StreamingContext) -> DStream:
        users = c.table(updates=c.queue_stream([]))
        return c.queue_stream([]).map(lambda x: (x, 1)).join(users)

    def windowed(c: StreamingContext) -> DStream:
        pairs = _kafka(c).map(lambda x: (x, 1))
        return pairs.reduce_by_key_and_window(operator.add, operator.sub, 4, 2)

    def stateful(c: StreamingContext) -> DStream:
        state = _kafka(c).map(lambda x: (x, 1)).update_state_by_key(lambda vs, s: s)
        return state.transform(lambda rdd: rdd)

    return [
        (_plan(joined, source_partitions=3)[0], 1),
        (_plan(windowed, source_partitions=2)[0], 0),
        (_plan(lambda c: _kafka(c).window(3, 1).count(), source_partitions=2)[0], 0),
        (_plan(stateful, source_partitions=3)[0], 2),
        (_plan(table)[0], 0),
    ]


@pytest.mark.parametrize("case", range(5))
def test_one_task_re_planned_alone_is_the_task_its_batch_lists(case: int) -> None:
    plan, first = _graphs()[case]
    listed = 0
    for b in range(first, first + 9):
        for t in plan.tasks_for_batch(b, first):
            assert plan.task_for(t.id, first) == t, t.id
            listed += 1
    assert listed > 0
    for bad in ("in/0/3/0", "rd/99/3/0", "sh/1/9/3/0", "rd/x/3/0", "out/1/3", "sh/1/0/3/999"):
        assert plan.task_for(bad, first) is None
