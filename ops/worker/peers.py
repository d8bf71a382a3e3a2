"""Which peer to call next, and the worker's connections to its peers.

A worker calls its peers on the seal path (replicating each sealed input block to one
peer) and on the task path (fetching a block from its holders). Every such call has a
short deadline (:attr:`ops.config.Settings.peer_deadline_s`); a peer that misses it is
*suspect* for a while. Suspects are tried last, so a paused or wedged peer costs one
deadline, once, rather than one per block or per fetch, until the coordinator has declared
it lost (and sent assignments without it) or it answers again.

:class:`PeerHealth` is pure decision logic: no sockets, and the clock is a parameter.

:class:`PeerPool` holds the worker's RPC clients of its peers and bounds the connections
they keep open: a fetch may go to any worker of the fleet, so without a bound a worker
would end up with a connection to every other (a thousand workers: a thousand sockets and
reader threads each, and as many handler threads on every server). Beyond
``DSTREAM_PEER_CONNECTIONS`` open connections the least recently used idle one is closed
first, and connections unused for :data:`PEER_IDLE_S` are closed. A closed connection is
reopened by the next call to that peer (one TCP connect and handshake, about a
millisecond on a LAN).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from typing import Generic, Protocol, TypeVar

__all__ = ["PEER_IDLE_S", "PeerClient", "PeerHealth", "PeerPool", "try_order"]

#: A peer connection unused this long is closed. A worker calls its replica peer every
#: seal and the holders of a shuffle every batch, so connections in use stay open (60 s is
#: many batch intervals); what this closes is the connection to a peer that left the
#: fleet's assignment or the shuffle's holders, e.g. after a rescale.
PEER_IDLE_S = 60.0
#: How often the pool looks for idle connections, at most (and at least every half idle
#: timeout): closing an idle connection a few seconds late costs nothing.
SWEEP_EVERY_S = 5.0


def try_order(candidates: Iterable[str], suspects: Collection[str]) -> list[str]:
    """*candidates* in the order to try them: the others first, then the suspects.

    Each group keeps the order it was given in (the coordinator's preference: the
    replica peer it assigned, the holders it named). Duplicates are dropped.
    """
    seen: set[str] = set()
    first: list[str] = []
    last: list[str] = []
    for c in candidates:
        if c in seen:
            continue
        seen.add(c)
        (last if c in suspects else first).append(c)
    return first + last


class PeerHealth:
    """Peers that missed a deadline lately (thread-safe).

    Args:
        suspect_for_s: how long a miss makes a peer suspect. The worker uses the
            heartbeat timeout: by then the coordinator has declared a paused peer lost
            and sent new replica peers, or the peer is back.
        clock: a monotonic clock (tests pass their own).

    """

    def __init__(self, suspect_for_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.suspect_for_s = suspect_for_s
        self.clock = clock
        self._missed: dict[str, float] = {}
        self._lock = threading.Lock()

    def missed(self, peer: str) -> None:
        """*peer* missed a deadline (or failed) just now: try it last for a while."""
        with self._lock:
            self._missed[peer] = self.clock()

    def answered(self, peer: str) -> None:
        """*peer* answered in time: it is no longer suspect."""
        with self._lock:
            self._missed.pop(peer, None)

    def suspects(self) -> set[str]:
        """The peers that missed a deadline less than ``suspect_for_s`` ago."""
        now = self.clock()
        with self._lock:
            for p in [p for p, t in self._missed.items() if now - t >= self.suspect_for_s]:
                del self._missed[p]
            return set(self._missed)

    def order(self, candidates: Iterable[str], skip: Collection[str] = ()) -> list[str]:
        """The peers of *candidates* to try, in order: see :func:`try_order`.

        *skip* names peers not to try at all (those that already failed during the same
        seal: a seal never waits twice on one peer).
        """
        return try_order((c for c in candidates if c not in skip), self.suspects())


class PeerClient(Protocol):
    """What the pool needs of a client (:class:`ops.rpc.RpcClient`)."""

    @property
    def connected(self) -> bool: ...

    @property
    def last_used(self) -> float: ...

    def disconnect_if_idle(self, idle_s: float, now: float | None = None) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=PeerClient)


class PeerPool(Generic[C]):
    """The worker's clients of its peers, one per address, with bounded open connections.

    Args:
        factory: makes the client of an address (connects lazily, on its first call).
        max_open: connections kept open at most (``DSTREAM_PEER_CONNECTIONS``); a call in
            progress is never cut, so concurrent calls may exceed it while they last.
        idle_s: a connection unused this long is closed (:data:`PEER_IDLE_S`).
        clock: a monotonic clock, the one the clients stamp ``last_used`` with.

    Thread-safe. Clients are never closed before :meth:`close` (a caller may hold one):
    only their connections are, and a client without a connection holds no socket and
    no thread. :meth:`start` runs the idle sweep on a daemon thread.

    """

    def __init__(
        self,
        factory: Callable[[str], C],
        max_open: int,
        idle_s: float = PEER_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factory = factory
        self.idle_s = idle_s
        self.max_open = max_open
        self.clock = clock
        self._clients: OrderedDict[str, C] = OrderedDict()  # least recent first
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: connections closed so far: idle for idle_s, and beyond max_open
        self.closed_idle = 0
        self.closed_lru = 0

    def get(self, addr: str) -> C:
        """The client of *addr*, marked most recently used.

        Over the bound, the least recently used idle connections of other peers are
        closed first (their clients reconnect on their next call).
        """
        with self._lock:
            c = self._clients.get(addr)
            if c is None:
                c = self._clients[addr] = self.factory(addr)
            else:
                self._clients.move_to_end(addr)
            others = [o for a, o in self._clients.items() if a != addr and o.connected]
        excess = len(others) + 1 - self.max_open  # + 1: *c* is about to be used
        if excess > 0:
            now = self.clock()
            for o in others:  # least recently used first
                if excess <= 0:
                    break
                if o.disconnect_if_idle(0.0, now):
                    excess -= 1
                    with self._lock:
                        self.closed_lru += 1
        return c

    def sweep(self) -> int:
        """Close the connections unused for ``idle_s``; returns how many were closed."""
        with self._lock:
            clients = list(self._clients.values())
        now = self.clock()
        closed = sum(1 for c in clients if c.disconnect_if_idle(self.idle_s, now))
        with self._lock:
            self.closed_idle += closed
        return closed

    def open_connections(self) -> int:
        """Peer connections open now."""
        with self._lock:
            return sum(1 for c in self._clients.values() if c.connected)

    def start(self) -> PeerPool[C]:
        """Sweep idle connections on a daemon thread until :meth:`close`."""
        every = max(0.05, min(SWEEP_EVERY_S, self.idle_s / 2))

        def loop() -> None:
            while not self._stop.wait(every):
                self.sweep()

        self._thread = threading.Thread(target=loop, name="peer-pool-sweep", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the sweep and close every client (the worker is stopping)."""
        self._stop.set()
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for c in clients:
            c.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
