"""Tables (``ssc.table``) and stream-table joins: in-process engine against the reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from engine import StreamingContext
from engine.codec import encode_input_block
from engine.errors import GraphError
from engine.local import LocalRunner
from engine.plan import Plan
from engine.reference import ReferenceRunner
from engine.scheduler import CHECKPOINT, BatchCompleted, LaunchTask, ReadInput, Scheduler
from engine.sinks import LocalSinks
from engine.testing import assert_batches_equal

VIEWS = [
    [("u1", "/a"), ("u2", "/b"), ("u9", "/c")],
    [("u1", "/d"), ("u3", "/e")],
    [("u2", "/f"), ("u3", "/g"), ("u1", "/h")],
    [("u3", "/i"), ("u4", "/j")],
    [],
    [("u1", "/k"), ("u4", "/l"), ("u2", "/m")],
]
USERS = [
    [("u1", {"name": "ann"}), ("u2", {"name": "bob"})],
    [("u3", {"name": "cy"}), ("u1", {"name": "ann2"})],  # update
    [("u2", None)],  # delete
    [("u4", {"name": "di"}), ("u4", None), ("u3", {"name": "cy2"})],  # set+delete: nothing
    [("u2", {"name": "bob2"})],  # back
    [("u9", None)],  # delete of a missing key: no change
]


def _build(how: str, parts: int, path: Path | None = None, window: int = 0) -> Any:
    ssc = StreamingContext(1.0, num_partitions=parts)
    views = ssc.queue_stream(VIEWS)
    users = ssc.table(updates=ssc.queue_stream(USERS), path=str(path) if path else None)
    if window:
        views = views.window(window, window)
    joined = views.join(users) if how == "join" else views.left_outer_join(users)
    collected: list[Any] = []
    joined.foreach_batch(lambda t, r: collected.append(list(r)))
    changes: list[Any] = []
    users.foreach_batch(lambda t, r: changes.append(list(r)))
    snap: list[Any] = []
    users.snapshot().foreach_batch(lambda t, r: snap.append(list(r)))
    return ssc, (collected, changes, snap)


def _engine(how: str, parts: int, **kw: Any) -> Any:
    ssc, out = _build(how, parts, **kw)
    LocalRunner(ssc).run(len(VIEWS))
    return out


def _reference(how: str, **kw: Any) -> Any:
    ssc, _ = _build(how, 1, **kw)
    ref = ReferenceRunner(ssc)
    ref.run(len(VIEWS))
    return [[recs for _, recs in ref.outputs[i]] for i in sorted(ref.outputs)]


@pytest.mark.parametrize("how", ["join", "left_outer_join"])
@pytest.mark.parametrize("parts", [1, 3])
def test_stream_table_join_equals_reference(how: str, parts: int) -> None:
    got = _engine(how, parts)
    for actual, expected in zip(got, _reference(how), strict=True):
        assert_batches_equal(actual, expected)


def test_join_sees_the_table_as_of_the_end_of_its_batch() -> None:
    joined, changes, snap = _engine("left_outer_join", 2)
    expected = [
        [("u1", ("/a", {"name": "ann"})), ("u2", ("/b", {"name": "bob"})), ("u9", ("/c", None))],
        [("u1", ("/d", {"name": "ann2"})), ("u3", ("/e", {"name": "cy"}))],
        [("u2", ("/f", None)), ("u3", ("/g", {"name": "cy"})), ("u1", ("/h", {"name": "ann2"}))],
        [("u3", ("/i", {"name": "cy2"})), ("u4", ("/j", None))],
        [],
        [
            ("u1", ("/k", {"name": "ann2"})),
            ("u4", ("/l", None)),
            ("u2", ("/m", {"name": "bob2"})),
        ],
    ]
    assert_batches_equal(joined, expected)
    assert_batches_equal(
        changes,
        [
            [("u1", {"name": "ann"}), ("u2", {"name": "bob"})],
            [("u3", {"name": "cy"}), ("u1", {"name": "ann2"})],
            [("u2", None)],
            [("u3", {"name": "cy2"})],
            [("u2", {"name": "bob2"})],
            [],
        ],
    )
    assert sorted(snap[-1]) == [
        ("u1", {"name": "ann2"}),
        ("u2", {"name": "bob2"}),
        ("u3", {"name": "cy2"}),
    ]


def test_file_table_is_the_content_at_the_first_batch(tmp_path: Path) -> None:
    path = tmp_path / "users.jsonl"
    lines = [
        {"key": "u9", "value": {"name": "nine"}},
        {"key": "u4", "value": {"name": "old"}},
        {"key": "u4", "value": None},
        {"key": "u3", "value": {"name": "file"}},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    got = _engine("join", 3, path=path)
    for actual, expected in zip(got, _reference("join", path=path), strict=True):
        assert_batches_equal(actual, expected)
    joined = got[0]
    assert ("u9", ("/c", {"name": "nine"})) in [tuple(map(_tup, r)) for r in joined[0]]
    assert sorted(got[2][0]) == sorted(
        [("u1", {"name": "ann"}), ("u2", {"name": "bob"}), ("u3", {"name": "file"}),
         ("u9", {"name": "nine"})]
    )  # fmt: skip


def _tup(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


def test_file_only_table(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"key": "u1", "value": 1}\n{"key": "u2", "value": 2}\n')

    def build(parts: int) -> tuple[StreamingContext, list[Any]]:
        ssc = StreamingContext(1.0, num_partitions=parts)
        out: list[Any] = []
        ssc.queue_stream(VIEWS).join(ssc.table(path=str(path))).foreach_batch(
            lambda t, r: out.append(list(r))
        )
        return ssc, out

    ssc, got = build(4)
    LocalRunner(ssc).run(len(VIEWS))
    ssc1, _ = build(1)
    ref = ReferenceRunner(ssc1)
    ref.run(len(VIEWS))
    (expected,) = ref.outputs.values()
    assert_batches_equal(got, [r for _, r in expected])
    assert sum(map(len, got)) == 7  # every view of u1 (4) and u2 (3)


def test_windowed_stream_joins_a_table() -> None:
    got = _engine("left_outer_join", 2, window=2)
    for actual, expected in zip(got, _reference("left_outer_join", window=2), strict=True):
        assert_batches_equal(actual, expected)
    assert len(got[0]) == len(VIEWS) // 2  # one join result per window


def test_the_table_is_not_shuffled_for_the_join() -> None:
    ssc = StreamingContext(1.0, num_partitions=3)
    users = ssc.table(updates=ssc.queue_stream(USERS))
    joined = ssc.queue_stream(VIEWS).join(users)
    joined.foreach_batch(lambda t, r: None)
    plan = Plan(ssc.nodes, {})
    tasks = plan.tasks_for_batch(2, 0)
    join = joined.node.id
    assert not [t for t in tasks if t.node == join and t.kind == "map" and t.side == 1]
    reduces = [t for t in tasks if t.node == join and t.kind == "result"]
    assert [t.part for t in reduces] == [0, 1, 2]
    for t in reduces:
        assert (f"rd/{users.node.id}/2/{t.part}", -1) in t.inputs


def test_table_topic_source_decodes_keys_and_tombstones() -> None:
    ssc = StreamingContext(1.0, num_partitions=2)
    users = ssc.table("users")
    src = users.node.parents[0]
    out: list[Any] = []
    users.snapshot().foreach_batch(lambda t, r: out.append(sorted(r)))
    sinks = LocalSinks()
    runner = LocalRunner(ssc, source_partitions={src.id: 1}, sinks=sinks)
    blocks = [
        encode_input_block(
            "users", 0, 0, 4, [b'{"n":1}', b'{"n":2}', b"not json", b'{"n":3}'],
            [0, 1, 2, 3], [b"a", b"b", b"c", None], [0, 0, 0, 0],
        ),
        encode_input_block("users", 0, 4, 6, [None, b'"x"'], [4, 5], [b"a", b"b"], [0, 0]),
    ]  # fmt: skip
    for b, data in enumerate(blocks):
        runner.run_batch({f"in/{src.id}/{b}/0": data})
    assert out == [[("a", {"n": 1}), ("b", {"n": 2})], [("b", "x")]]
    # a value that is not JSON and a record without a key are dead-lettered
    assert sorted((d.offset, d.value) for d in sinks.dead) == [(2, b"not json"), (3, b'{"n":3}')]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda ssc, v, t: t.join(v), "right side"),
        (lambda ssc, v, t: v.right_outer_join(t), "right side"),
        (lambda ssc, v, t: v.full_outer_join(t), "right side"),
        (lambda ssc, v, t: v.join(t, num_partitions=5), "table's 3 partitions"),
        (lambda ssc, v, t: ssc.table(), "give a topic"),
        (lambda ssc, v, t: ssc.table("x", updates=v), "not both"),
        (lambda ssc, v, t: ssc.table(path="/nonexistent/t.jsonl"), "cannot read"),
        (lambda ssc, v, t: ssc.table(updates=v.window(2, 2)), "not a window"),
    ],
)
def test_table_graph_errors(build: Any, match: str) -> None:
    ssc = StreamingContext(1.0, num_partitions=3)
    views = ssc.queue_stream(VIEWS)
    table = ssc.table(updates=ssc.queue_stream(USERS))
    with pytest.raises(GraphError, match=match):
        build(ssc, views, table)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json\n", "line 1 is not JSON"),
        ('{"key": "a", "value": 1}\n[1, 2]\n', "line 2 must be"),
        ('{"key": [1], "value": 1}\n', "key must be a string"),
    ],
)
def test_bad_table_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(GraphError, match=match):
        StreamingContext(1.0).table(path=str(path))


def _table_plan() -> tuple[Plan, int, int]:
    """views (kafka, 2 partitions) joined with a users table (kafka, 1 partition)."""
    ssc = StreamingContext(1.0, num_partitions=2)
    views = ssc.kafka_stream("views")
    users = ssc.table("users")
    joined = views.map(lambda v: (v["user"], v)).join(users)
    joined.foreach_batch(lambda t, r: None)
    src_views, src_users = views.node.id, users.node.parents[0].id
    return Plan(ssc.nodes, {src_views: 2, src_users: 1}), users.node.id, joined.node.id


def _seal(s: Scheduler, b: int, workers: list[str]) -> None:
    s.add_batch(b, now=float(b))
    for bid in (f"in/0/{b}/0", f"in/0/{b}/1", f"in/1/{b}/0"):
        for w in workers:
            s.block_added(bid, w, 100)


def _drain(s: Scheduler, now: float) -> list[Any]:
    seen: list[Any] = []
    for _ in range(200):
        out = s.tick(now)
        seen.extend(out)
        for i in out:
            if isinstance(i, ReadInput):  # the shell re-reads it from Kafka
                s.block_added(i.block_id, sorted(s.slots)[0], 10)
        launches = [i for i in out if isinstance(i, LaunchTask)]
        if not launches and not any(isinstance(i, ReadInput) for i in out):
            return seen
        for ins in launches:
            if ins.spec.kind == "output":
                assert s.request_commit(ins.spec.id, ins.attempt) == "granted"
            seen.extend(s.task_finished(ins.spec.id, ins.attempt, ins.worker, now + 0.01, 10))
    raise AssertionError("scheduler did not settle")


def test_a_lost_table_partition_is_rebuilt_from_its_checkpoint_like_state() -> None:
    plan, table, join = _table_plan()
    s = Scheduler(plan, first=0)
    s.add_worker("a", 4)
    s.add_worker("b", 4)
    for b in range(4):
        _seal(s, b, ["a", "b"])
        _drain(s, float(b))
    s.set_checkpoint(table, 0, 1)
    s.set_checkpoint(table, 1, 1)
    assert CHECKPOINT in s.holders(f"rd/{table}/1/0")
    lost = next(iter(s.holders(f"rd/{table}/3/0")))
    s.remove_worker(lost)
    alive = [w for w in ("a", "b") if w != lost]
    _seal(s, 4, alive)
    events = _drain(s, 60.0)
    assert BatchCompleted(4) in events
    rebuilt = {i.spec.id for i in events if isinstance(i, LaunchTask)}
    # the table's partitions since the checkpoint were recomputed, then the join ran
    assert {f"rd/{table}/2/0", f"rd/{table}/3/0"} <= rebuilt
    assert f"rd/{table}/1/0" not in rebuilt  # the checkpoint stops the lineage
    assert f"rd/{join}/4/0" in rebuilt
    assert s.stats.recomputed > 0


@pytest.mark.parametrize(
    ("fmt", "raw", "value"),
    [("msgpack", msgpack.packb({"n": 1}), {"n": 1}), ("raw", b"\x00bytes", b"\x00bytes")],
)
def test_table_topic_value_formats(fmt: str, raw: bytes, value: Any) -> None:
    ssc = StreamingContext(1.0, num_partitions=2)
    users = ssc.table("users", value_format=fmt)
    src = users.node.parents[0]
    out: list[Any] = []
    users.foreach_batch(lambda t, r: out.append(list(r)))
    runner = LocalRunner(ssc, source_partitions={src.id: 1})
    block = encode_input_block("users", 0, 0, 2, [raw, None], [0, 1], [b"k", b"gone"], [0, 0])
    runner.run_batch({f"in/{src.id}/0/0": block})
    assert out == [[("k", value)]]  # deleting a key the table never held changes nothing
