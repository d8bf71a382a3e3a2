"""The leader's query answering (ops.coordinator.queries) with fake workers: no services.

Checked here: an answer is read at one batch from every partition, or wholly from the
checkpoints in force, or refused after waiting; never a mix, never a partial state.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from engine import StreamingContext
from engine.errors import RpcError
from engine.plan import Plan
from engine.query import QueryError, select
from ops import protocol as wire
from ops.coordinator.queries import StateQueries
from ops.http import HttpEndpoints
from state.checkpoint import CheckpointMissing

PARTS = 2


def _plan() -> Plan:
    ssc = StreamingContext(1.0, num_partitions=PARTS)
    pairs = ssc.queue_stream([[("a", 1)]]).map(lambda x: x)
    pairs.running_reduce(operator.add).name("counts")
    pairs.window(2, 2).name("last")
    pairs.foreach_batch(lambda t, r: None)
    return Plan(ssc.nodes, {})


def state_at(b: int, p: int) -> list[tuple[str, int]]:
    """Partition *p*'s state at batch *b* in these tests (different at every batch)."""
    return [(f"p{p}-k{i}", b) for i in range(2)]


class FakeScheduler:
    def __init__(self, plan: Plan, done: int) -> None:
        self.plan = plan
        self.done = done
        self.lost: set[str] = set()
        self.checkpoints: dict[tuple[int, int], int] = {}

    def done_upto(self) -> int:
        return self.done

    def holders(self, bid: str) -> set[str]:
        return set() if bid in self.lost else {"w1"}


class FakeWorker:
    """Answers ``query_part`` as a worker would, from :func:`state_at`; can fail."""

    def __init__(self, sched: FakeScheduler) -> None:
        self.sched = sched
        self.fail_once = False
        self.calls: list[wire.QueryPartition] = []

    def call(self, method: str, params: Any, timeout: float) -> Any:
        assert method == "query_part"
        msg = wire.QueryPartition.from_wire(params)
        self.calls.append(msg)
        if self.fail_once:  # the block was freed as the next batch completed
            self.fail_once = False
            self.sched.done += 1
            raise RpcError("remote BlockMissing: block is not available")
        entries, more = select("state", state_at(msg.batch, msg.part), msg.keys, msg.prefix)
        return {"items": entries, "more": more}


class FakeCheckpoints:
    def __init__(self) -> None:
        self.reads: list[tuple[int, int, int]] = []

    def read_items(self, node: int, part: int, batch: int) -> list[Any]:
        self.reads.append((node, part, batch))
        if batch < 0:
            raise CheckpointMissing("gone")
        return [list(kv) for kv in state_at(batch, part)]


class Members:
    def __init__(self, worker: FakeWorker) -> None:
        self.workers = {"w1": type("Info", (), {"client": worker})()}


@pytest.fixture
def setup() -> Iterator[tuple[StateQueries, FakeScheduler, FakeWorker, FakeCheckpoints]]:
    plan = _plan()
    sched = FakeScheduler(plan, done=7)
    worker = FakeWorker(sched)
    ckpts = FakeCheckpoints()
    q = StateQueries(
        app_id="app",
        scheduler=sched,  # type: ignore[arg-type]
        membership=Members(worker),  # type: ignore[arg-type]
        checkpoints=ckpts,
        times=lambda b: 1000 * b,
        lock=threading.RLock(),
        first=0,
        interval_ms=1000,
        wait_s=0.3,
    )
    try:
        yield q, sched, worker, ckpts
    finally:
        q.close()


def _all(b: int) -> list[list[Any]]:
    return sorted([list(kv) for p in range(PARTS) for kv in state_at(b, p)])


def test_every_partition_is_read_at_the_last_completed_batch(setup: Any) -> None:
    q, _sched, worker, _ = setup
    a = q.answer(wire.Query("app", "counts"))
    assert (a["batch"], a["batch_time_ms"], a["source"], a["kind"]) == (7, 7000, "workers", "state")
    assert a["items"] == _all(7) and not a["more"] and a["missing"] == []
    assert sorted(m.part for m in worker.calls) == [0, 1]
    assert {m.batch for m in worker.calls} == {7}
    a = q.answer(wire.Query("app", "counts", ["p1-k0", "nope"]))
    assert a["items"] == [["p1-k0", 7]] and a["missing"] == ["nope"]


def test_a_block_freed_meanwhile_makes_the_query_read_the_next_batch(setup: Any) -> None:
    q, _sched, worker, _ = setup
    worker.fail_once = True
    a = q.answer(wire.Query("app", "counts"))
    assert a["batch"] == 8 and a["source"] == "workers" and a["items"] == _all(8)


def test_a_lost_partition_is_answered_wholly_from_the_checkpoint(setup: Any) -> None:
    q, sched, _worker, ckpts = setup
    node = next(n for n in q.plan.nodes if n.name == "counts")
    sched.lost = {f"rd/{node.id}/7/1"}
    sched.checkpoints = {(node.id, 0): 5, (node.id, 1): 5}
    a = q.answer(wire.Query("app", "counts"))
    assert (a["batch"], a["source"]) == (5, "checkpoint")
    assert a["items"] == _all(5)
    assert sorted(ckpts.reads) == [(node.id, 0, 5), (node.id, 1, 5)]


def test_without_one_checkpoint_batch_the_query_waits_then_refuses(setup: Any) -> None:
    q, sched, _worker, _ = setup
    node = next(n for n in q.plan.nodes if n.name == "counts")
    sched.lost = {f"rd/{node.id}/7/1"}
    sched.checkpoints = {(node.id, 0): 5, (node.id, 1): 2}  # not one batch: no answer
    with pytest.raises(QueryError, match="being rebuilt") as e:
        q.answer(wire.Query("app", "counts"))
    assert e.value.status == 503


def test_a_window_is_read_at_its_last_end(setup: Any) -> None:
    q, _sched, worker, _ = setup
    q.answer(wire.Query("app", "last"))
    assert {m.batch for m in worker.calls} == {7}  # (7 + 1) % 2 == 0: a window ends at 7
    _sched.done = 8
    worker.calls.clear()
    q.answer(wire.Query("app", "last"))
    assert {m.batch for m in worker.calls} == {7}
    assert all(set(m.locations) for m in worker.calls)


def test_errors(setup: Any) -> None:
    q, sched, _worker, _ = setup
    with pytest.raises(QueryError, match="runs app 'app', not 'other'"):
        q.answer(wire.Query("other", "counts"))
    with pytest.raises(QueryError, match="unknown stream"):
        q.answer(wire.Query("app", "nosuch"))
    with pytest.raises(QueryError, match="limit must be"):
        q.answer(wire.Query("app", "counts", limit=0))
    sched.done = -1
    with pytest.raises(QueryError, match="no batch of the app has completed yet") as e:
        q.answer(wire.Query("app", "counts"))
    assert e.value.status == 503


def test_query_messages_round_trip() -> None:
    q = wire.Query("app", "counts", ["a"], "p", 5)
    assert wire.Query.from_wire(q.to_wire()) == q
    assert wire.method_of(q) == "query"
    m = wire.QueryPartition(3, 7, 1, {"rd/3/7/1": ["w1"]}, ["a"], "", 100)
    assert wire.QueryPartition.from_wire(m.to_wire()) == m
    assert "query_part" in wire.COORDINATOR_CALLS  # a deposed coordinator's query is refused


def test_the_state_endpoint_needs_the_token_like_status() -> None:
    asked: list[tuple[str, list[str], str, int | None]] = []

    def query(stream: str, keys: list[str], prefix: str, limit: int | None) -> Any:
        asked.append((stream, keys, prefix, limit))
        return 200, {"stream": stream}

    import json
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    http = HttpEndpoints(
        "127.0.0.1", 0, live=lambda: True, ready=lambda: True, token="s3cret", query=query
    ).start()

    def get(path: str, token: str | None) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{http.port}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with opener.open(req, timeout=5) as r:
                assert json.loads(r.read())["stream"] == "counts"
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code

    try:
        assert get("/api/state/counts?key=a", None) == 401
        assert get("/api/state/counts?key=a", "wrong") == 401
        assert asked == []
        assert get("/api/state/counts?key=a&key=b%20c&prefix=x&limit=5", "s3cret") == 200
        assert asked == [("counts", ["a", "b c"], "x", 5)]
        assert get("/api/state/counts?limit=many", "s3cret") == 400
    finally:
        http.stop()
