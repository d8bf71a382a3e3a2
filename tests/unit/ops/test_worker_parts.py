"""A worker's parts without services: the task runner and the membership loop.

The coordinator is a fake that answers the wire protocol; the executor a stub.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

from engine.errors import FencedError, UserFunctionError
from engine.executor import BlockMissing, TaskResult
from engine.plan import TaskSpec
from ops import protocol as wire
from ops.config import load_settings
from ops.rpc import ConnectionLost, RpcTimeout
from ops.worker.membership import WorkerMembership
from ops.worker.task_runner import TaskRunner
from state.blockstore import BlockStore

OUT = TaskSpec("out/4/0/0", "output", 4, 0, 0, 0, (("rd/3/0/0", -1),), "output:4")
MAP = TaskSpec("rd/3/0/0", "result", 3, 0, 0, 0, (("in/0/0/0", -1),), "reduce:3")


def _settings() -> Any:
    return load_settings(
        secret="worker-parts-test-secret",
        kafka_bootstrap="127.0.0.1:9",
        redis_url="redis://127.0.0.1:9/0",
        heartbeat_interval=0.05,
    )


class FakeCoordinator:
    """Answers calls from a script per method; records every call."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Any]] = []
        self.resets = 0

    def call(self, method: str, params: Any = None, timeout: float = 0) -> Any:
        self.calls.append((method, params))
        script = self.answers.get(method, [True])
        answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def reset(self) -> None:
        self.resets += 1

    def sent(self, method: str) -> list[Any]:
        return [p for m, p in self.calls if m == method]


class StubExecutor:
    def __init__(self, result: Any) -> None:
        self.result = result

    def run(self, spec: TaskSpec, fetch: Any) -> TaskResult:
        if isinstance(self.result, Exception):
            raise self.result
        return TaskResult(spec, block=self.result, records=[("k", 1)], input_records=3)


class Plan:
    by_id: ClassVar[dict[int, str]] = {4: "output node", 3: "result node"}

    def stateful_nodes(self) -> list[Any]:
        return []


class Sinks:
    def __init__(self) -> None:
        self.committed: list[str] = []

    def commit(self, node: Any, spec: TaskSpec, time_ms: int, records: Any, guard: Any) -> None:
        assert guard()
        self.committed.append(spec.id)

    def dead_letters(self, letters: Any) -> None:
        raise AssertionError("none expected")


def _runner(coord: FakeCoordinator, result: Any, leased: bool = True) -> tuple[TaskRunner, Sinks]:
    sinks = Sinks()
    r = TaskRunner(
        _settings(),
        BlockStore(),
        coord,  # type: ignore[arg-type]
        lambda addr: None,  # type: ignore[arg-type,return-value]
        None,  # type: ignore[arg-type]
        sinks,  # type: ignore[arg-type]
        worker_id=lambda: "w1",
        leased=lambda _inc: leased,
        stopping=threading.Event(),
    )
    r.configure(Plan(), StubExecutor(result))  # type: ignore[arg-type]
    return r, sinks


def test_an_output_commits_once_granted_after_waiting_then_reports_done() -> None:
    coord = FakeCoordinator({"request_commit": ["wait", "wait", "granted"]})
    r, sinks = _runner(coord, None)
    r.run(OUT, 0, {}, 1000)
    assert len(coord.sent("request_commit")) == 3 and sinks.committed == ["out/4/0/0"]
    done = wire.TaskDone.from_wire(coord.sent("task_done")[0])
    assert (done.task, done.worker, done.input_records) == ("out/4/0/0", "w1", 3)


def test_a_denied_or_unleased_output_commits_nothing_and_reports_nothing() -> None:
    coord = FakeCoordinator({"request_commit": ["denied"]})
    r, sinks = _runner(coord, None)
    r.run(OUT, 1, {}, 1000)
    assert sinks.committed == [] and coord.sent("task_done") == []
    coord = FakeCoordinator({})
    r, sinks = _runner(coord, None, leased=False)
    r.run(OUT, 0, {}, 1000)
    assert coord.sent("request_commit") == [], "a worker without its lease does not even ask"


def test_a_result_is_stored_and_its_size_reported() -> None:
    coord = FakeCoordinator({})
    r, _ = _runner(coord, b"12345")
    r.run(MAP, 0, {}, 0)
    assert r.store.get("rd/3/0/0") == b"12345"
    assert wire.TaskDone.from_wire(coord.sent("task_done")[0]).size == 5


def test_failures_carry_their_kind() -> None:
    cases = [
        (UserFunctionError("map:1", ValueError("x"), 1, "t/0@5"), wire.FailureKind.APP_FAILED),
        (FencedError("old epoch"), wire.FailureKind.FENCED),
        (BlockMissing("in/0/0/0", ["w2"]), wire.FailureKind.MISSING_INPUT),
        (ValueError("bug"), wire.FailureKind.ERROR),
    ]
    for error, kind in cases:
        coord = FakeCoordinator({})
        r, _ = _runner(coord, error)
        r.run(MAP, 0, {}, 0)
        failed = wire.TaskFailed.from_wire(coord.sent("task_failed")[0])
        assert failed.kind is kind, error
        if kind is wire.FailureKind.MISSING_INPUT:
            assert (failed.missing, failed.gone_from) == ("in/0/0/0", ["w2"])


def test_a_cancelled_attempt_neither_commits_nor_reports() -> None:
    coord = FakeCoordinator({"request_commit": ["granted"]})
    r, sinks = _runner(coord, None)
    r.cancel(wire.Cancel("out/4/0/0", 0))
    r.run(OUT, 0, {}, 0)
    assert coord.calls == [] and sinks.committed == []


class FakeReceivers:
    received = 7
    lag: dict[tuple[str, int], int] = {("t", 0): 2}  # noqa: RUF012

    def __init__(self) -> None:
        self.assigned: list[Any] = []

    def assign(self, parts: list[Any]) -> None:
        self.assigned.append(parts)


def _run_membership(
    coord: FakeCoordinator,
    receivers: FakeReceivers,
    on_joined: Callable[[wire.RegisterReply], None],
    beats: int,
) -> WorkerMembership:
    """Run a worker's membership loop until it sent *beats* heartbeats (5 s at most)."""
    stopping = threading.Event()
    m = WorkerMembership(
        _settings(),
        coord,  # type: ignore[arg-type]
        BlockStore(),
        receivers,  # type: ignore[arg-type]
        stopping,
        worker_id=lambda: "w1",
        http_port=lambda: 9100,
        on_joined=on_joined,
    )
    t = threading.Thread(target=m.run, daemon=True)
    t.start()
    for _ in range(100):
        if len(coord.sent("heartbeat")) >= beats:
            break
        stopping.wait(0.05)
    stopping.set()
    t.join(2)
    return m


def test_a_heartbeat_timeout_drops_the_coordinator_connection() -> None:
    """No answer in time (a partition): the next heartbeat opens a fresh connection.

    A refused connection (``ConnectionLost``) has none to drop; a timeout does.
    """
    reply = wire.RegisterReply(3, 10, {0: [("t", 0)]}, 1000).to_wire()
    beats = [RpcTimeout("no answer"), ConnectionLost("refused"), RpcTimeout("no answer"), "ok"]
    coord = FakeCoordinator({"register": [reply], "heartbeat": beats})
    _run_membership(coord, FakeReceivers(), lambda r: None, 5)
    assert len(coord.sent("heartbeat")) >= 5
    assert coord.resets == 2


def test_membership_registers_heartbeats_and_rejoins_when_unknown() -> None:
    reply = wire.RegisterReply(3, 10, {0: [("t", 0)]}, 1000).to_wire()
    newer = wire.RegisterReply(4, 10, {0: [("t", 0)]}, 1000).to_wire()
    coord = FakeCoordinator({"register": [reply, newer], "heartbeat": ["ok", "unknown", "ok"]})
    joined: list[wire.RegisterReply] = []
    receivers = FakeReceivers()
    m = _run_membership(coord, receivers, joined.append, 3)
    assert [r.epoch for r in joined] == [3, 4] and m.epoch == 4 and m.first == 10
    assert m.incarnation == 1, "tasks of the forgotten incarnation may not commit"
    assert receivers.assigned[0] == [], "receivers pause until the partitions are resent"
    beat = wire.Heartbeat.from_wire(coord.sent("heartbeat")[0])
    assert (beat.worker, beat.received, beat.lag) == ("w1", 7, {("t", 0): 2})
    reg = wire.Register.from_wire(coord.sent("register")[0])
    assert (reg.worker, reg.http_port) == ("w1", 9100)
    assert m.leased(1) and not m.leased(0)
