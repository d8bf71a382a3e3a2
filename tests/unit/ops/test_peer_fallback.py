"""Which peer next: replication and fetches fall back past a peer that missed its deadline.

No services: peers are fakes that answer, time out or say the block is gone, and the
clock of :class:`ops.worker.peers.PeerHealth` is a variable.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from engine.executor import BlockMissing
from ops.config import load_settings
from ops.coordinator.batch_clock import SEAL_WAIT_FRACTION, SEAL_WAIT_MIN_S
from ops.rpc import RemoteError, RpcTimeout
from ops.worker import Worker
from ops.worker.peers import PeerHealth, try_order
from ops.worker.task_runner import TaskRunner
from state.blockstore import BlockStore


def _settings(**kw: Any) -> Any:
    return load_settings(
        secret="peer-fallback-test-secret",
        kafka_bootstrap="127.0.0.1:9",
        redis_url="redis://127.0.0.1:9/0",
        batch_interval=0.3,
        **kw,
    )


class FakePeer:
    """A peer that answers (``ok``), times out (``slow``) or has no such block (``gone``)."""

    def __init__(self, addr: str, mode: str, calls: list[tuple[str, str, float]]) -> None:
        self.addr, self.mode, self.calls = addr, mode, calls

    def call(self, method: str, params: Any = None, timeout: float = 0) -> Any:
        self.calls.append((self.addr, method, timeout))
        if self.mode == "slow":
            msg = f"{method!r} to {self.addr} got no answer in {timeout} s"
            raise RpcTimeout(msg)
        if self.mode == "gone":
            raise RemoteError("KeyError", "no such block")
        return b"data from " + self.addr.encode() if method == "fetch" else True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_try_order_puts_suspects_last_keeping_the_given_order() -> None:
    assert try_order(["a", "b", "c", "d"], {"a", "c"}) == ["b", "d", "a", "c"]
    assert try_order(["a", "b", "a"], set()) == ["a", "b"]
    assert try_order([], {"a"}) == []


def test_a_peer_that_missed_a_deadline_is_suspect_until_it_answers_or_time_passes() -> None:
    clock = Clock()
    health = PeerHealth(1.5, clock=clock)
    health.missed("p")
    assert health.order(["p", "q"]) == ["q", "p"]
    assert health.order(["p", "q"], skip={"q"}) == ["p"]
    clock.now += 1.4
    assert health.suspects() == {"p"}
    clock.now += 0.2  # the heartbeat timeout has passed: the coordinator knows by now
    assert health.suspects() == set()
    assert health.order(["p", "q"]) == ["p", "q"]
    health.missed("q")
    health.answered("q")
    assert health.suspects() == set()


def _worker(peers: dict[str, str]) -> tuple[Worker, list[tuple[str, str, float]]]:
    """A worker with only what replication uses (no sockets, no services)."""
    calls: list[tuple[str, str, float]] = []
    w = Worker.__new__(Worker)
    w.settings = _settings()
    w.peer_ids = list(peers)
    w.peer_health = PeerHealth(w.settings.heartbeat_timeout)
    clients = {a: FakePeer(a, m, calls) for a, m in peers.items()}
    w._peer = clients.__getitem__  # type: ignore[method-assign]
    return w, calls


def test_replication_falls_back_to_another_peer_and_skips_the_slow_one_after() -> None:
    w, calls = _worker({"paused": "slow", "q": "ok", "r": "ok"})
    failed: set[str] = set()
    assert w._replicate_block("in/0/5/0", b"x", failed) == ["q"]
    assert [c[0] for c in calls] == ["paused", "q"]
    assert all(c[2] == w.settings.peer_deadline_s == 0.1 for c in calls)
    # the next block of the same seal does not wait on the paused peer again
    assert w._replicate_block("in/0/5/1", b"x", failed) == ["q"]
    assert [c[0] for c in calls] == ["paused", "q", "q"]
    # nor does the next seal, while the peer is suspect
    assert w._replicate_block("in/0/6/0", b"x", set()) == ["q"]
    assert [c[0] for c in calls] == ["paused", "q", "q", "q"]


def test_replication_with_no_live_peer_keeps_one_holder() -> None:
    w, calls = _worker({"paused": "slow", "other": "gone"})
    assert w._replicate_block("in/0/5/0", b"x", set()) == []
    assert [c[0] for c in calls] == ["paused", "other"]
    w, calls = _worker({})
    assert w._replicate_block("in/0/5/0", b"x", set()) == []


def _fetcher(peers: dict[str, str]) -> tuple[TaskRunner, list[tuple[str, str, float]]]:
    calls: list[tuple[str, str, float]] = []
    clients = {a: FakePeer(a, m, calls) for a, m in peers.items()}
    r = TaskRunner(
        _settings(),
        BlockStore(),
        None,  # type: ignore[arg-type]
        clients.__getitem__,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        worker_id=lambda: "me",
        leased=lambda _inc: True,
        stopping=threading.Event(),
    )
    r.plan = object()  # type: ignore[assignment]  # only sh/ blocks are fetched here
    return r, calls


def test_a_fetch_moves_past_a_holder_that_misses_its_deadline() -> None:
    r, calls = _fetcher({"paused": "slow", "q": "ok"})
    fetch = r.fetcher({"sh/1/5/0": ["me", "paused", "q"]})
    assert fetch("sh/1/5/0", 0) == b"data from q"
    assert [c[0] for c in calls] == ["paused", "q"]
    assert calls[0][2] == 0.1
    # the next fetch asks the holder that answered first
    fetch("sh/1/5/0", 1)
    assert [c[0] for c in calls] == ["paused", "q", "q"]


def test_a_fetch_with_no_holder_answering_names_them_for_the_missing_input_path() -> None:
    r, _calls = _fetcher({"paused": "slow", "empty": "gone"})
    fetch = r.fetcher({"sh/1/5/0": ["paused", "empty"]})
    with pytest.raises(BlockMissing) as e:
        fetch("sh/1/5/0", 0)
    assert sorted(e.value.gone_from) == ["empty", "paused"]


def test_the_peer_deadline_is_below_the_heartbeat_timeout() -> None:
    assert _settings().peer_deadline_s == 0.1
    assert load_settings(secret="s", batch_interval=1.0).peer_deadline_s == 0.25
    assert load_settings(secret="s", batch_interval=10).peer_deadline_s == 0.75
    assert load_settings(secret="s", batch_interval=0.02).peer_deadline_s == 0.1
    assert load_settings(secret="s", peer_deadline=0.4).peer_deadline_s == 0.4
    with pytest.raises(Exception, match="below the heartbeat timeout"):
        load_settings(secret="s", peer_deadline=1.5)


@pytest.mark.parametrize("interval", [0.02, 0.1, 0.3, 0.5, 1.0, 2.0, 10.0])
def test_the_peer_deadline_is_below_the_seal_wait(interval: float) -> None:
    """A worker whose replica peer is paused gives up on it before the coordinator gives
    up on the worker's own seal answer (which would set a healthy worker apart)."""
    settings = load_settings(secret="s", batch_interval=interval)
    seal_wait = max(interval * SEAL_WAIT_FRACTION, SEAL_WAIT_MIN_S)
    assert settings.peer_deadline_s <= seal_wait / 2
