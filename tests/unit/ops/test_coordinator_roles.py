"""The coordinator's roles, one by one and wired as a leader: no Kafka, no Redis, no sockets.

Workers are fakes that answer the wire protocol (:mod:`ops.protocol`); the metadata log is
:class:`state.metalog.MemoryMetaLog`; the I/O pool runs calls inline.
"""

from __future__ import annotations

import operator
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any

import pytest
import redis

from engine.graph import StreamingContext
from engine.plan import Plan
from engine.scheduler import LaunchTask, Scheduler
from ops import protocol as wire
from ops.config import load_settings
from ops.coordinator.completion import BatchInfo, Completion
from ops.coordinator.durable import DurableWriter
from ops.coordinator.leader import Leader
from ops.coordinator.leadership import LeaderElection
from ops.coordinator.membership import Membership, WorkerClient
from ops.coordinator.rate_control import RateController
from ops.coordinator.receivers import ReceiverTracker, positions_after, start_positions
from state.metalog import Lease, LoggedBatch, MemoryMetaLog, OffsetRange, decode_logged

LAYOUT = {0: [("t", 0), ("t", 1)]}


class InlineIO(Executor):
    """An I/O pool that runs every call at once (deterministic tests)."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except Exception as e:
            f.set_exception(e)
        return f


class FakeWorker:
    """A worker's RPC client: records every message, answers as a worker would."""

    def __init__(self, wid: str, tracker_positions: dict[tuple[int, int], int]) -> None:
        self.id = wid
        self.sent: list[Any] = []
        self.parts: list[wire.PartitionAssignment] = []
        self.peers: list[str] = []
        self.pos = tracker_positions
        self.closed = False

    def call(self, method: str, params: Any = None, timeout: float = 0) -> Any:
        raise AssertionError("roles send typed messages")

    def close(self) -> None:
        self.closed = True

    def send(self, msg: Any, timeout: float = 0) -> Any:
        self.sent.append(msg)
        if isinstance(msg, wire.Assign):
            self.parts, self.peers = list(msg.parts), list(msg.peers)
            return True
        if isinstance(msg, wire.Seal):
            out = []
            for a in self.parts:  # ten records per partition per batch
                rng = OffsetRange(a.topic, a.partition, self.pos[(a.node, a.index)], 0, 10)
                rng = rng._replace(until=rng.start + 10)
                self.pos[(a.node, a.index)] = rng.until
                bid = f"in/{a.node}/{msg.batch}/{a.index}"
                out.append(wire.BlockReport(bid, rng, 100, [self.id, *self.peers[:1]]).to_wire())
            return out
        if isinstance(msg, wire.ReadInput | wire.ReplicateTo):
            return 100
        return True

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]


def _plan() -> Plan:
    ssc = StreamingContext(1.0, num_partitions=2)
    ssc.kafka_stream("t").map(lambda x: (x, 1)).reduce_by_key(operator.add).foreach_batch(
        lambda t, r: None
    )
    return Plan(ssc.nodes, {0: 2})


def _settings(**kw: Any) -> Any:
    return load_settings(
        secret="roles-test-secret",
        kafka_bootstrap="127.0.0.1:9",
        redis_url="redis://127.0.0.1:9/0",
        **kw,
    )


# -- membership -----------------------------------------------------------------------------
def test_membership_registers_once_and_hands_blocks_to_the_scheduler() -> None:
    sched = Scheduler(_plan(), 0)
    clients: dict[str, FakeWorker] = {}

    def connect(wid: str) -> Any:
        clients[wid] = FakeWorker(wid, {})
        return clients[wid]

    m = Membership(sched, connect)
    assert m.register(wire.Register("a", 2, ["in/0/0/0"]), now=1.0)
    assert not m.register(wire.Register("a", 2, []), now=2.0), "a known worker is kept"
    assert sched.slots == {"a": 2}
    assert sched.holders("in/0/0/0") == {"a"}
    assert m.heartbeat(wire.Heartbeat("b"), 3.0) is wire.HeartbeatAnswer.UNKNOWN
    beat = wire.Heartbeat("a", 10, 1, 5, {("t", 0): 7})
    assert m.heartbeat(beat, 3.0) is wire.HeartbeatAnswer.OK
    assert m.lag("a", ("t", 0)) == 7
    assert m.silent(now=3.5, limit_s=1.0) == []
    assert m.silent(now=4.5, limit_s=1.0) == ["a"]
    assert m.lose("a") is not None and clients["a"].closed
    assert m.lose("a") is None, "losing twice is a no-op"
    assert "a" not in sched.slots


# -- receiver tracking ----------------------------------------------------------------------
def test_assignment_is_balanced_sticky_and_names_peers() -> None:
    layout = {0: [("t", i) for i in range(4)]}
    rt = ReceiverTracker(layout, {(0, i): 10 * i for i in range(4)})
    msgs = rt.assign(["b", "a"])
    assert not rt.dirty
    assert [p.index for p in msgs["a"].parts] == [0, 2]
    assert msgs["a"].peers == ["b"] and msgs["b"].peers == ["a"]
    start = {p.index: p.start for m in msgs.values() for p in m.parts}
    assert start == {0: 0, 1: 10, 2: 20, 3: 30}
    before = dict(rt.assignment)
    msgs = rt.assign(["a", "b", "c", "d"])
    moved = [k for k, w in rt.assignment.items() if before[k] != w]
    assert len(moved) == 2, "only what the new workers' quotas need moves"
    assert sorted(len(m.parts) for m in msgs.values()) == [1, 1, 1, 1]


def test_a_report_past_the_logged_position_is_read_again_not_skipped() -> None:
    """A seal answer was lost: the worker's next block starts past the logged position."""
    rt = ReceiverTracker(LAYOUT, {(0, 0): 5, (0, 1): 7})
    rt.assign(["a"])
    assert not rt.dirty
    gapped = wire.BlockReport("in/0/4/0", OffsetRange("t", 0, 9, 12, 3), 10, ["a"])
    fine = wire.BlockReport("in/0/4/1", OffsetRange("t", 1, 7, 8, 1), 10, ["a"])
    kept = rt.continuing([gapped, fine])
    assert kept == [fine]
    ranges = rt.record_batch(4, 4000, kept)
    # offsets 5..8 are in no range yet: the partition stays at 5 and is assigned anew
    assert ranges["in/0/4/0"] == OffsetRange("t", 0, 5, 5, 0)
    rt.advance(kept)
    assert rt.positions == {(0, 0): 5, (0, 1): 8}
    assert rt.dirty
    starts = {p.index: p.start for p in rt.assign(["a"])["a"].parts}
    assert starts == {0: 5, 1: 8}, "the worker re-reads partition 0 from 5"


def test_a_batch_gets_a_range_for_every_partition() -> None:
    rt = ReceiverTracker(LAYOUT, {(0, 0): 5, (0, 1): 7})
    rep = wire.BlockReport("in/0/3/0", OffsetRange("t", 0, 5, 9, 4), 10, ["a"])
    ranges = rt.record_batch(3, 3000, [rep])
    assert ranges == {
        "in/0/3/0": OffsetRange("t", 0, 5, 9, 4),
        "in/0/3/1": OffsetRange("t", 1, 7, 7, 0),  # nobody reported it: empty, at 7
    }
    assert rt.times[3] == 3000
    rt.advance([rep])
    assert rt.positions == {(0, 0): 9, (0, 1): 7}
    assert positions_after({3: ranges}) == {(0, 0): 9, (0, 1): 7}
    assert rt.range_of("in/0/3/1") == OffsetRange("t", 1, 7, 7, 0)
    assert rt.input_ranges(["in/0/3/0", "rd/2/3/0", "in/0/9/0"]) == {"in/0/3/0": (5, 9)}
    rt.prune(4)
    assert rt.range_of("in/0/3/0") is None and rt.times == {}


def test_start_positions_ask_kafka_only_for_what_the_log_does_not_cover() -> None:
    asked: list[Any] = []

    def first_offsets(need: list[tuple[int, int, str, int]]) -> dict[tuple[int, int], int]:
        asked.extend(need)
        return {(n, i): 100 for n, i, _t, _p in need}

    layout = {0: [("t", 0), ("t", 1)], 1: [("", 0)]}
    pos = start_positions(layout, {(0, 0): 42}, first_offsets)
    assert pos == {(0, 0): 42, (0, 1): 100, (1, 0): 0}
    assert asked == [(0, 1, "t", 1)]


# -- completion and rate control ------------------------------------------------------------
def test_completion_advances_progress_and_applies_checkpoints_once_their_batch_is_done() -> None:
    plan = _plan()
    sched = Scheduler(plan, 0)
    metalog = MemoryMetaLog()
    epoch = metalog.bump_epoch()
    deleted: list[tuple[int, int, int]] = []

    class Store:
        def delete_before(self, node: int, part: int, batch: int) -> None:
            deleted.append((node, part, batch))

    pruned: list[int] = []
    c = Completion(
        sched,
        metalog,
        Store(),
        DurableWriter(threading.Event(), lambda: None),
        InlineIO(),
        pruned.append,
        0,
        epoch,
        None,
    )
    seen: list[float] = []

    class Listener:
        def on_batch_completed(self, info: BatchInfo, processing_s: float) -> None:
            seen.append(processing_s)

    c.listeners.append(Listener())
    sched.add_worker("a", 2)
    for b in (0, 1):
        c.started(BatchInfo(b, b * 1000, sealed_at=0.0, records=3))
        sched.add_batch(b, 0.0)
        for p in (0, 1):
            sched.block_added(f"in/0/{b}/{p}", "a", 10)
    c.checkpointed(wire.Checkpointed(2, 0, 1))
    for _ in range(50):  # run every task to completion, in order
        launched = [i for i in sched.tick(1.0) if isinstance(i, LaunchTask)]
        if not launched:
            break
        for ins in launched:
            if ins.spec.kind == "output":
                assert sched.request_commit(ins.spec.id, ins.attempt) == "granted"
            for out in sched.task_finished(ins.spec.id, ins.attempt, "a", 1.0, 10):
                if type(out).__name__ == "BatchCompleted":
                    c.batch_completed(out.batch, now=2.0)
    assert c.done == 1 and metalog.done() == 1
    assert metalog.checkpoints() == {(2, 0): 1} and deleted == [(2, 0, 1)]
    assert len(seen) == 2 and [i.batch for i in c.history] == [0, 1]
    assert pruned and c.batches == {}


def test_rate_controller_sizes_a_cap_from_the_processing_rate() -> None:
    rc = RateController(interval_s=1.0, partitions=2, max_records=0)
    rc.on_batch_completed(BatchInfo(0, 0, 0.0, records=1000), processing_s=0.5)
    assert rc.cap == 800  # 2000 rec/s * 1 s * 0.8 / 2 partitions
    rc.on_batch_completed(BatchInfo(1, 0, 0.0, records=1000), processing_s=1.0)
    assert rc.cap == (800 + 400) // 2
    capped = RateController(1.0, 2, max_records=100)
    capped.on_batch_completed(BatchInfo(0, 0, 0.0, records=1000), processing_s=0.5)
    assert capped.cap == 100
    rc.on_batch_completed(BatchInfo(2, 0, 0.0, records=1), processing_s=1.0)
    assert rc.cap == 600, "a batch with fewer records than partitions says nothing"


# -- leader election ------------------------------------------------------------------------
class _CutOffMetaLog(MemoryMetaLog):
    """A metadata log the test can cut off, as an unreachable Redis is."""

    cut_off = False

    def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        if self.cut_off:
            raise redis.ConnectionError("cut off by the test")
        return super().renew_lease(lease, ttl_s)


def test_election_leads_refuses_in_doubt_and_steps_down_when_deposed() -> None:
    metalog = _CutOffMetaLog()
    stopping = threading.Event()
    now = [100.0]
    loaded: list[Lease] = []
    e = LeaderElection(
        metalog, lambda: "me:1", 2.0, stopping, loaded.append, lambda: None, lambda: now[0]
    )
    assert not e.holds_lease() and not e.may_act("seal")
    assert e.refused == 0, "a standby refuses nothing: it never had the lease"
    t = threading.Thread(target=e.run, daemon=True)
    t.start()
    assert e.leading.wait(5)
    assert loaded == [e.lease] and e.epoch == 1 and e.leads()
    metalog.cut_off = True  # renewals fail from now on
    now[0] += 10  # ... and the last one is older than the lease: in doubt, not deposed
    assert not e.may_act("seal") and e.refused == 1 and e.holds_lease()
    metalog.cut_off = False
    assert metalog.leader() == Lease(1, "me:1")
    metalog.release_lease(Lease(1, "me:1"))
    assert metalog.acquire_lease("other:1", 10) is not None
    t.join(5)  # the next renewal (every ttl / 4) finds the other holder
    assert e.deposed and stopping.is_set() and not e.holds_lease()


# -- the leader, wired ----------------------------------------------------------------------
@pytest.fixture
def leader() -> Any:
    metalog = MemoryMetaLog()
    lease = metalog.acquire_lease("me:1", 10)
    assert lease is not None
    settings = _settings(speculation=False)
    positions: dict[tuple[int, int], int] = {}
    fakes: dict[str, FakeWorker] = {}

    def connect(wid: str) -> WorkerClient:
        fakes[wid] = FakeWorker(wid, positions)
        return fakes[wid]  # type: ignore[return-value]

    resume = Leader.load(metalog, lease.epoch)
    pos = Leader.positions(LAYOUT, resume, lambda need: {(n, i): 0 for n, i, _t, _p in need})
    positions.update(pos)
    failed: list[str] = []
    ld = Leader(
        settings=settings,
        app_id="roles",
        holder="me:1",
        plan=_plan(),
        layout=LAYOUT,
        interval_ms=1000,
        expect_workers=2,
        resume=resume,
        positions=pos,
        metalog=metalog,
        checkpoints=type("S", (), {"delete_before": lambda *a: None})(),
        durable=DurableWriter(threading.Event(), lambda: None),
        connect=connect,
        io=InlineIO(),
        lock=threading.RLock(),
        stopping=threading.Event(),
        may_act=lambda _what: True,
        fail_app=failed.append,
    )
    return ld, metalog, fakes, failed


def _run_launched(ld: Leader, fakes: dict[str, FakeWorker]) -> int:
    """Answer every launch as its worker would (commit, then task_done); how many ran."""
    ran = 0
    for _ in range(20):
        pending = [(w, m) for w in fakes.values() for m in w.of(wire.Launch)]
        for w in fakes.values():
            w.sent = [m for m in w.sent if not isinstance(m, wire.Launch)]
        if not pending:
            return ran
        for w, m in pending:
            if m.spec.kind == "output":
                ask = wire.RequestCommit(m.spec.id, m.attempt, w.id).to_wire()
                assert ld.handlers["request_commit"](ask) == "granted"
            done = wire.TaskDone(m.spec.id, m.attempt, w.id, 10)
            assert ld.handlers["task_done"](done.to_wire()) is True
            ran += 1
    raise AssertionError("tasks kept coming")


def test_a_leader_seals_logs_schedules_and_completes_a_batch(leader: Any) -> None:
    ld, metalog, fakes, _ = leader
    for wid in ("a", "b"):
        reply = ld.handlers["register"](wire.Register(wid, 2).to_wire())
        assert wire.RegisterReply.from_wire(reply).layout == LAYOUT
    ld.clock.send_assignments()
    assert sorted(len(f.of(wire.Assign)[0].parts) for f in fakes.values()) == [1, 1]
    ld.clock.seal_batch(5000)
    logged = metalog.logged()[0]
    assert logged.ranges["in/0/0/0"] == OffsetRange("t", 0, 0, 10, 10)
    assert logged.time_ms == 5000, "the batch time survives a restart"
    assert set(logged.ranges) == {"in/0/0/0", "in/0/0/1"}, "input blocks only"
    launches = [m for f in fakes.values() for m in f.of(wire.Launch)]
    assert launches and all(m.time_ms == 5000 for m in launches)
    assert any(m.ranges == {"in/0/0/0": (0, 10)} for m in launches), "inputs carry ranges"
    assert _run_launched(ld, fakes) >= 4
    assert ld.completion.done == 0 and metalog.done() == 0
    status = ld.status.build()
    assert status["batches"][0]["records"] == 20 and status["pending"] == []
    assert {r["owner"] for r in status["receivers"]} == {"a", "b"}


def test_a_lost_worker_is_removed_and_its_partitions_move(leader: Any) -> None:
    ld, _metalog, fakes, _ = leader
    for wid in ("a", "b"):
        ld.handlers["register"](wire.Register(wid, 2).to_wire())
    ld.clock.send_assignments()
    ld.membership.workers["a"].last_seen -= 1000
    with ld.lock:
        for wid in ld.membership.silent(time.monotonic(), 5.0):
            ld.lose_worker(wid)
    assert list(ld.membership.workers) == ["b"] and fakes["a"].closed
    assert ld.receivers.dirty and ld.completion.recovering is not None
    heartbeat = wire.Heartbeat("a").to_wire()
    assert ld.handlers["heartbeat"](heartbeat) == "unknown", "a lost worker must rejoin"
    ask = wire.RequestCommit("out/3/0/0", 0, "a").to_wire()
    assert ld.handlers["request_commit"](ask) == "denied", "a lost worker commits nothing"
    ld.clock.seal_batch(0)
    assert len(fakes["b"].of(wire.Assign)[-1].parts) == 2, "b reads both partitions now"


def test_app_failure_is_decided_by_the_failure_kind_not_the_message(leader: Any) -> None:
    ld, _metalog, _fakes, failed = leader
    ld.handlers["register"](wire.Register("a", 2).to_wire())
    retry = wire.TaskFailed("rd/2/0/0", 0, "a", "UserFunctionError: looks like one")
    assert ld.handlers["task_failed"](retry.to_wire()) is True
    assert failed == [], "an ERROR is retried, whatever its text"
    app = wire.TaskFailed("rd/2/0/0", 0, "a", "ValueError: x", wire.FailureKind.APP_FAILED)
    assert ld.handlers["task_failed"](app.to_wire()) is True
    assert failed == ["ValueError: x"]


def test_a_batch_logged_in_the_older_form_is_read() -> None:
    """Logs written before the batch time had its own field kept it as a pseudo block."""
    old = {"in/0/4/0": ["t", 0, 5, 9, 4], "@time": ["", 0, 4000, 4000, 0]}
    assert decode_logged(old) == LoggedBatch(4000, {"in/0/4/0": OffsetRange("t", 0, 5, 9, 4)})
    new = {"time_ms": 4000, "ranges": {"in/0/4/0": ["t", 0, 5, 9, 4]}}
    assert decode_logged(new) == decode_logged(old)
