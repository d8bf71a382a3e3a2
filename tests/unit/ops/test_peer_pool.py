"""The worker's peer connection pool: bounded, idle connections closed, calls never cut.

Pool logic with fake clients and a fake clock; ``RpcClient.disconnect_if_idle`` and the
pool with real clients and servers on loopback sockets (no services).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from engine.errors import RpcError
from ops.rpc import ConnectionLost, Peer, RpcClient, RpcServer
from ops.worker.peers import PeerPool

pytestmark = pytest.mark.unit

SECRET = b"pool-secret"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """Stands for an RpcClient: ``use`` is a call (connects), ``busy`` one in progress."""

    def __init__(self, addr: str, clock: Clock) -> None:
        self.addr = addr
        self.clock = clock
        self.connected = False
        self.busy = False
        self.closed = False
        self.last_used = clock()

    def use(self) -> None:
        self.connected = True
        self.last_used = self.clock()

    def disconnect_if_idle(self, idle_s: float, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        if self.busy or not self.connected or now - self.last_used < idle_s:
            return False
        self.connected = False
        return True

    def close(self) -> None:
        self.closed = True
        self.connected = False


def _pool(max_open: int, idle_s: float = 30.0) -> tuple[PeerPool[FakeClient], Clock]:
    clock = Clock()
    return PeerPool(lambda a: FakeClient(a, clock), max_open, idle_s, clock), clock


def test_open_connections_stay_within_the_bound_as_the_fleet_grows() -> None:
    pool, clock = _pool(max_open=4)
    for fleet in (4, 24, 1000):
        for i in range(fleet):  # one batch: a call to every peer, in turn
            clock.now += 0.001
            pool.get(f"w{i}:7000").use()
            assert pool.open_connections() <= 4
    assert pool.open_connections() == 4
    assert pool.closed_lru == 1024 - 4


def test_the_least_recently_used_connection_is_closed_first() -> None:
    pool, clock = _pool(max_open=2)
    a, b = pool.get("a"), pool.get("b")
    a.use()
    b.use()
    clock.now += 1
    pool.get("a").use()  # a is now the most recent
    c = pool.get("c")
    c.use()
    assert (a.connected, b.connected, c.connected) == (True, False, True)
    assert pool.get("b") is b, "a client is kept (only its connection closed)"


def test_a_call_in_progress_is_never_cut() -> None:
    pool, _clock = _pool(max_open=1)
    a = pool.get("a")
    a.use()
    a.busy = True
    pool.get("b").use()
    assert a.connected, "a busy connection stays open, over the bound, until its call ends"
    a.busy = False
    pool.get("c").use()
    assert pool.open_connections() == 1


def test_the_sweep_closes_only_connections_idle_for_the_timeout() -> None:
    pool, clock = _pool(max_open=10, idle_s=30.0)
    old, recent, busy = pool.get("old"), pool.get("recent"), pool.get("busy")
    old.use()
    busy.use()
    busy.busy = True
    clock.now += 20
    recent.use()
    clock.now += 15  # old and busy: 35 s unused; recent: 15 s
    assert pool.sweep() == 1
    assert (old.connected, recent.connected, busy.connected) == (False, True, True)
    assert pool.closed_idle == 1


def test_close_closes_every_client() -> None:
    pool, _clock = _pool(max_open=10)
    clients = [pool.get(a) for a in "abc"]
    pool.close()
    assert all(c.closed for c in clients)


# -- real clients and servers on loopback ------------------------------------------------
class Handler:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, method: str, params: Any, peer: Peer) -> Any:
        if method == "block":
            self.entered.set()
            self.release.wait(10)
        return params


@pytest.fixture
def servers() -> Iterator[list[tuple[RpcServer, Handler]]]:
    made = []
    for _ in range(5):
        h = Handler()
        made.append((RpcServer(h, secret=SECRET).start(), h))
    yield made
    for s, h in made:
        h.release.set()
        s.stop()


def _addr(server: RpcServer) -> str:
    host, port = server.address
    return f"{host}:{port}"


def test_disconnect_if_idle_waits_for_the_call_and_the_client_reconnects(
    servers: list[tuple[RpcServer, Handler]],
) -> None:
    server, handler = servers[0]
    client = RpcClient(server.address, secret=SECRET)
    try:
        assert client.call("echo", 1) == 1 and client.connected
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(client.call("block", 2)))
        t.start()
        assert handler.entered.wait(10)
        assert not client.disconnect_if_idle(0.0), "a call is in progress"
        handler.release.set()
        t.join(10)
        assert result == [2] and client.connected
        assert not client.disconnect_if_idle(3600.0), "used just now"
        assert client.disconnect_if_idle(0.0) and not client.connected
        assert not client.disconnect_if_idle(0.0), "nothing left to close"
        assert client.call("echo", 3) == 3 and client.connected, "the next call reconnects"
    finally:
        client.close()


def test_reset_drops_the_connection_and_fails_the_call_in_progress(
    servers: list[tuple[RpcServer, Handler]],
) -> None:
    """``RpcClient.reset`` (a dead path): unlike ``disconnect_if_idle``, calls or not."""
    server, handler = servers[0]
    client = RpcClient(server.address, secret=SECRET)
    try:
        assert client.call("echo", 1) == 1 and client.connected
        failed: list[BaseException] = []

        def blocked() -> None:
            try:
                client.call("block", 2, timeout=30)
            except RpcError as e:
                failed.append(e)

        t = threading.Thread(target=blocked)
        t.start()
        assert handler.entered.wait(10)
        assert client.reset() and not client.connected
        t.join(10)
        assert [type(e) for e in failed] == [ConnectionLost], "failed at once, not at 30 s"
        assert not client.reset(), "nothing left to drop"
        handler.release.set()
        assert client.call("echo", 3) == 3 and client.connected, "the next call reconnects"
    finally:
        client.close()


def test_a_pool_of_real_clients_keeps_its_bound_and_every_call_answers(
    servers: list[tuple[RpcServer, Handler]],
) -> None:
    pool: PeerPool[RpcClient] = PeerPool(
        lambda a: RpcClient(a, secret=SECRET), max_open=2, idle_s=3600.0
    )
    try:
        for round_ in range(3):
            for i, (s, _h) in enumerate(servers):
                assert pool.get(_addr(s)).call("echo", [round_, i]) == [round_, i]
                assert pool.open_connections() <= 2
        assert pool.open_connections() == 2
        assert pool.closed_lru == 3 * len(servers) - 2
    finally:
        pool.close()
