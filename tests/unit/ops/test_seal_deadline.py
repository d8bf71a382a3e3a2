"""The batch clock cuts a batch without a worker that does not answer its seal in time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ops import protocol as wire
from ops.coordinator.batch_clock import APART_GRACE_S, BatchClock, Sealed
from state.metalog import OffsetRange

INTERVAL = 0.3


class _Client:
    """A worker's RPC client: answers seals with one block, or hangs until released."""

    def __init__(self, wid: str, part: int) -> None:
        self.wid, self.part = wid, part
        self.hang = threading.Event()  # set: seals wait for *release*
        self.release = threading.Event()
        self.seals: list[int] = []
        self.freed: list[str] = []

    def send(self, msg: Any, timeout: float) -> Any:
        if isinstance(msg, wire.Free):
            self.freed.extend(msg.blocks)
            return 0
        assert isinstance(msg, wire.Seal)
        self.seals.append(msg.batch)
        if self.hang.is_set():
            self.release.wait(10)
        rng = OffsetRange("t", self.part, msg.batch * 10, msg.batch * 10 + 10, 10)
        block = f"in/0/{msg.batch}/{self.part}"
        return [wire.BlockReport(block, rng, 100, [self.wid, "peer"]).to_wire()]


class _Worker:
    def __init__(self, wid: str, client: _Client) -> None:
        self.id, self.client = wid, client


class _Membership:
    def __init__(self, workers: dict[str, _Worker]) -> None:
        self.workers = workers


@pytest.fixture
def clock() -> Any:
    io = ThreadPoolExecutor(8)
    clients = {w: _Client(w, i) for i, w in enumerate(["a", "b", "peer"])}
    workers = {w: _Worker(w, c) for w, c in clients.items()}
    bc = BatchClock(
        interval_s=INTERVAL,
        expect_workers=1,
        next_batch=0,
        replay=[],
        fresh=True,
        scheduler=None,  # type: ignore[arg-type]
        membership=_Membership(workers),  # type: ignore[arg-type]
        receivers=None,  # type: ignore[arg-type]
        completion=None,  # type: ignore[arg-type]
        dispatcher=None,  # type: ignore[arg-type]
        metalog=None,  # type: ignore[arg-type]
        durable=None,  # type: ignore[arg-type]
        epoch=1,
        io=io,
        lock=threading.RLock(),
        stopping=threading.Event(),
        may_act=lambda _doing: True,
        rate_cap=lambda: None,
    )
    yield bc, clients, workers
    for c in clients.values():
        c.release.set()
    io.shutdown(wait=True)


def _blocks(sealed: Sealed) -> set[str]:
    return {r.block for r in sealed.reports}


def test_a_hung_worker_is_left_out_after_one_interval(clock: Any) -> None:
    bc, clients, workers = clock
    ws = list(workers.values())
    assert _blocks(bc.collect_seals(0, ws)) == {"in/0/0/0", "in/0/0/1", "in/0/0/2"}

    clients["b"].hang.set()
    t0 = time.monotonic()
    sealed = bc.collect_seals(1, ws)
    took = time.monotonic() - t0
    assert _blocks(sealed) == {"in/0/1/0", "in/0/1/2"}, "b's block is not waited for"
    assert sealed.answered == {"a", "peer"}
    assert took < 5, f"the clock waited {took:.1f} s on a hung worker (seal timeout is 10 s)"

    # while b owes its answer it is not sealed again
    assert _blocks(bc.collect_seals(2, ws)) == {"in/0/2/0", "in/0/2/2"}
    assert clients["b"].seals == [0, 1]

    # its late answer names a block no logged range has: freed on every holder
    clients["b"].release.set()
    deadline = time.monotonic() + 5
    while "in/0/1/1" not in clients["peer"].freed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert clients["b"].freed == ["in/0/1/1"]
    assert clients["peer"].freed == ["in/0/1/1"]
    assert clients["a"].freed == []

    # answered: sealed again from the next batch on
    clients["b"].hang.clear()
    assert _blocks(bc.collect_seals(3, ws)) == {"in/0/3/0", "in/0/3/1", "in/0/3/2"}
    assert clients["b"].seals == [0, 1, 3]


def test_a_failed_seal_answer_frees_nothing(clock: Any) -> None:
    bc, clients, workers = clock

    def broken(msg: Any, timeout: float) -> Any:
        if isinstance(msg, wire.Seal):
            raise ConnectionError("gone")
        return 0

    clients["a"].send = broken  # type: ignore[method-assign]
    sealed = bc.collect_seals(0, list(workers.values()))
    assert _blocks(sealed) == {"in/0/0/1", "in/0/0/2"}
    assert sealed.answered == {"b", "peer"}
    assert all(not c.freed for c in clients.values())
    assert bc.late == {}


def test_a_worker_set_apart_is_sealed_but_not_waited_for(clock: Any) -> None:
    """A worker a missed ping set apart: its seal is sent, the cut does not wait on it."""
    bc, clients, workers = clock
    ws = list(workers.values())
    clients["b"].hang.set()
    t0 = time.monotonic()
    sealed = bc.collect_seals(0, ws, apart={"b"})
    took = time.monotonic() - t0
    assert _blocks(sealed) == {"in/0/0/0", "in/0/0/2"}
    assert clients["b"].seals == [0], "it is sealed (its answer takes it back)"
    # not the seal wait (half an interval), only the grace after the others answered
    assert took < bc.seal_wait_s() * 0.8, took
    assert "b" in bc.late

    # one set apart that answers at once is counted, as any other
    clients["b"].release.set()
    clients["b"].hang.clear()
    deadline = time.monotonic() + 5
    while not bc.late["b"].done() and time.monotonic() < deadline:
        time.sleep(0.01)
    sealed = bc.collect_seals(1, ws, apart={"b"})
    assert _blocks(sealed) == {"in/0/1/0", "in/0/1/1", "in/0/1/2"}
    assert sealed.answered == {"a", "b", "peer"}
    assert bc.seal_wait_s() > APART_GRACE_S
