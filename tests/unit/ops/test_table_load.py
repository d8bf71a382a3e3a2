"""A fresh app's tables are loaded before its first batch: the coordinator's decisions.

Which partitions get a load target, when the wait is over (or stalled, or failed), what the
assignment carries, and the wait itself against fake workers; no broker, no clock.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.graph import StreamingContext
from ops import protocol as wire
from ops.coordinator.receivers import ReceiverTracker
from ops.coordinator.tables import (
    LoadWatch,
    TableLoader,
    Verdict,
    load_targets,
    table_partitions,
)
from state.metalog import MemoryMetaLog


def _app() -> StreamingContext:
    ssc = StreamingContext(1.0, num_partitions=2)
    views = ssc.kafka_stream("views", value_format="json")
    users = ssc.table("users")
    pages = ssc.table(updates=ssc.queue_stream([[("p", 1)]]))
    views.map(lambda v: (v, v)).join(users).left_outer_join(pages).pprint()
    return ssc


def _layout(ssc: StreamingContext) -> dict[int, list[tuple[str, int]]]:
    layout: dict[int, list[tuple[str, int]]] = {}
    for n in ssc.nodes:
        if n.kind == "source":
            if n.args["source"] == "kafka":
                (topic,) = n.args["topics"]
                layout[n.id] = [(topic, p) for p in range(3 if topic == "views" else 2)]
            else:
                layout[n.id] = [("", 0)]
    return layout


def test_only_the_kafka_tables_partitions_are_loaded() -> None:
    ssc = _app()
    layout = _layout(ssc)
    parts = table_partitions(ssc.nodes, layout)
    assert sorted(parts.values()) == [("users", 0), ("users", 1)]
    (node,) = {n for n, _i in parts}
    assert list(ssc.nodes[node].args["topics"]) == ["users"]


def test_a_partition_with_records_before_its_end_gets_a_target() -> None:
    ends = {(1, 0): 500, (1, 1): 40, (1, 2): 7}
    starts = {(1, 0): 0, (1, 1): 40, (1, 2): 3}  # (1, 1) is empty (compacted to nothing)
    assert load_targets(ends, starts) == {(1, 0): 500, (1, 2): 7}
    assert load_targets({}, starts) == {}


def test_load_watch_waits_for_every_target_and_warns_then_fails_without_progress() -> None:
    w = LoadWatch({(1, 0): 100, (1, 1): 50}, started=0.0, timeout_s=30.0, warn_s=10.0)
    assert w.observe({(1, 0): 10, (1, 1): None}, 1.0) is Verdict.LOADING
    assert w.pending() == [(1, 0), (1, 1)]
    assert w.observe({(1, 0): 100, (1, 1): 49}, 2.0) is Verdict.LOADING
    assert w.pending() == [(1, 1)]
    assert w.describe({1: [("users", 0), ("users", 1)]}) == "users[1] at offset 49 of 50"
    # no progress: quiet, then a warning every warn_s, then failure at timeout_s
    assert w.observe({(1, 0): 100, (1, 1): 49}, 11.0) is Verdict.LOADING
    assert w.observe({(1, 0): 100, (1, 1): 49}, 12.0) is Verdict.STALLED
    assert w.observe({(1, 0): 100, (1, 1): 49}, 13.0) is Verdict.LOADING
    assert w.observe({(1, 0): 100, (1, 1): None}, 22.0) is Verdict.STALLED
    assert w.observe({(1, 0): 100, (1, 1): None}, 32.0) is Verdict.FAILED


def test_load_watch_counts_a_restarted_partition_as_progress_and_ends_when_all_reached() -> None:
    w = LoadWatch({(1, 0): 100}, started=0.0, timeout_s=30.0, warn_s=10.0)
    assert w.observe({(1, 0): 60}, 25.0) is Verdict.LOADING
    assert w.observe({(1, 0): None}, 30.0) is Verdict.LOADING  # its owner was lost
    assert w.observe({(1, 0): 5}, 34.0) is Verdict.LOADING  # read again by the new owner
    assert w.observe({(1, 0): 6}, 63.0) is Verdict.LOADING
    assert w.observe({(1, 0): 100}, 92.0) is Verdict.LOADED
    assert LoadWatch({}, started=0.0).observe({}, 0.0) is Verdict.LOADED


def _tracker() -> ReceiverTracker:
    layout = {0: [("views", 0), ("views", 1)], 1: [("users", 0)]}
    positions = {(0, 0): 0, (0, 1): 0, (1, 0): 0}
    return ReceiverTracker(layout, positions)


def test_the_assignment_carries_load_targets_until_a_batch_is_logged() -> None:
    rt = _tracker()
    rt.loads = {(1, 0): 900}
    msgs = rt.assign(["a", "b"])
    got = {(p.topic, p.partition): p.load_until for m in msgs.values() for p in m.parts}
    assert got == {("views", 0): None, ("views", 1): None, ("users", 0): 900}
    # the first batch is logged: later assignments (a worker joined or was lost) carry none
    rt.record_batch(0, 1000, [])
    msgs = rt.assign(["a", "b", "c"])
    assert all(p.load_until is None for m in msgs.values() for p in m.parts)
    assert rt.loads == {}


def test_load_targets_are_kept_once_for_a_leader_that_takes_over() -> None:
    log = MemoryMetaLog()
    assert log.load_offsets({"1/0": 900}) == {"1/0": 900}
    assert log.load_offsets({"1/0": 950}) == {"1/0": 900}  # a new leader: the first's ends
    log.clear_load_offsets()
    assert log.load_offsets({"1/0": 950}) == {"1/0": 950}


class _Client:
    """A worker's client: answers ``await_load`` from a script of positions."""

    def __init__(self, script: list[list[wire.TableLoad]]) -> None:
        self.script = script
        self.calls = 0

    def send(self, msg: Any, timeout: float) -> Any:
        assert isinstance(msg, wire.AwaitLoad) and timeout > msg.wait_s
        answer = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return [t.to_wire() for t in answer]


class _Worker:
    def __init__(self, wid: str, client: _Client) -> None:
        self.id, self.client = wid, client


class _Membership:
    def __init__(self, workers: dict[str, _Worker]) -> None:
        self.workers = workers


def _loader(
    client: _Client, rt: ReceiverTracker, failed: list[str], resent: list[int]
) -> TableLoader:
    return TableLoader(
        targets={(1, 0): 900},
        layout=rt.layout,
        receivers=rt,
        membership=_Membership({"a": _Worker("a", client)}),  # type: ignore[arg-type]
        send_assignments=lambda: resent.append(len(rt.assign(["a"]))),
        io=ThreadPoolExecutor(2),
        lock=threading.RLock(),
        stopping=threading.Event(),
        fail_app=failed.append,
    )


def test_the_first_batch_waits_until_the_owner_reports_the_target_reached() -> None:
    rt = _tracker()
    rt.loads = {(1, 0): 900}
    rt.assign(["a"])
    client = _Client(
        [
            [],  # the assignment did not reach it: sent again
            [wire.TableLoad("users", 0, 300, 900)],
            [wire.TableLoad("users", 0, 900, 900)],
        ]
    )
    failed: list[str] = []
    resent: list[int] = []
    assert _loader(client, rt, failed, resent).wait() is True
    assert client.calls == 3 and resent == [1] and failed == []


def test_the_wait_ends_when_stopped() -> None:
    rt = _tracker()
    rt.loads = {(1, 0): 900}
    rt.assign(["a"])
    client = _Client([[wire.TableLoad("users", 0, 10, 900)]])
    loader = _loader(client, rt, [], [])
    t = threading.Thread(target=lambda: setattr(loader, "result", loader.wait()))
    t.start()
    loader.stopping.set()
    t.join(10)
    assert not t.is_alive() and loader.result is False  # type: ignore[attr-defined]
