"""Liveness probes: the worker of a long-running task that does not answer a ping is set
apart at once (real RPC servers; the scheduler and membership are stand-ins)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ops.coordinator.membership import WorkerClient
from ops.coordinator.probes import Prober
from ops.rpc import RpcClient, RpcServer

SECRET = b"probe-test-secret-0123456789abcdef"


class _Worker:
    """A worker's RPC server: answers pings, or holds them while paused."""

    def __init__(self) -> None:
        self.paused = threading.Event()
        self.resumed = threading.Event()
        self.pings = 0
        self.server = RpcServer(self.handle, secret=SECRET).start()

    def handle(self, method: str, params: Any, peer: Any) -> Any:
        assert method == "ping"
        self.pings += 1
        if self.paused.is_set():
            self.resumed.wait(10)
        return "ok"


class _Scheduler:
    def __init__(self) -> None:
        self.slow: set[str] = set()
        self.apart: list[str] = []
        self.ages: list[float] = []

    def running_longer_than(self, now: float, age_s: float) -> set[str]:
        self.ages.append(age_s)
        return set(self.slow)

    def unresponsive(self) -> list[str]:
        return sorted(self.apart)

    def set_unresponsive(self, wid: str) -> list[Any]:
        self.apart.append(wid)
        return []


class _Membership:
    def __init__(self, clients: dict[str, WorkerClient]) -> None:
        self.clients = clients

    def get(self, wid: str) -> Any:
        c = self.clients.get(wid)
        return None if c is None else type("W", (), {"id": wid, "client": c})()

    def __contains__(self, wid: object) -> bool:
        return wid in self.clients


class _Dispatcher:
    def __init__(self) -> None:
        self.dispatched = 0

    def apply(self, instructions: list[Any]) -> None:
        pass

    def dispatch(self) -> None:
        self.dispatched += 1


@pytest.fixture
def fleet() -> Iterator[tuple[Prober, _Scheduler, dict[str, _Worker], _Dispatcher]]:
    workers = {w: _Worker() for w in ("a", "b")}
    clients = {
        w: WorkerClient(RpcClient(x.server.address, secret=SECRET), epoch=1)
        for w, x in workers.items()
    }
    sched, disp = _Scheduler(), _Dispatcher()
    prober = Prober(
        interval_s=1.0,
        scheduler=sched,  # type: ignore[arg-type]
        membership=_Membership(clients),  # type: ignore[arg-type]
        dispatcher=disp,  # type: ignore[arg-type]
        lock=threading.RLock(),
        stopping=threading.Event(),
        may_act=lambda _what: True,
    )
    yield prober, sched, workers, disp
    prober.close()
    for x in workers.values():
        x.resumed.set()
        x.server.stop()
    for c in clients.values():
        c.close()


def _wait(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_paused_worker_is_set_apart_within_the_probe_wait(fleet: Any) -> None:
    prober, sched, workers, disp = fleet
    wait = prober.wait_s()
    assert wait == 0.25  # a quarter of the 1 s interval
    assert prober.probe(time.monotonic()) == []  # no task runs long: no ping
    # a task running half the wait makes its worker a candidate
    assert sched.ages == [0.125]
    sched.slow = {"a", "b"}
    workers["b"].paused.set()
    t0 = time.monotonic()
    assert prober.probe(t0) == ["a", "b"]
    _wait(lambda: sched.apart == ["b"])
    took = time.monotonic() - t0
    assert wait <= took < wait + 1.0, took
    assert disp.dispatched == 1
    time.sleep(0.1)
    assert sched.apart == ["b"], "the worker that answered is not set apart"


def test_pings_are_rate_limited_and_skip_workers_set_apart(fleet: Any) -> None:
    prober, sched, workers, _disp = fleet
    sched.slow = {"a", "b"}
    sched.apart = ["b"]
    t0 = time.monotonic()
    assert prober.probe(t0) == ["a"]
    _wait(lambda: workers["a"].pings == 1)
    # pinged at most once per probe wait
    assert prober.probe(t0 + prober.wait_s() / 2) == []
    assert prober.probe(t0 + prober.wait_s() + 0.01) == ["a"]
    _wait(lambda: workers["a"].pings == 2)
    assert workers["b"].pings == 0
    assert sched.apart == ["b"]
