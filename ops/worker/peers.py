"""Which peer to call next: the worker's memory of peers that missed a deadline.

A worker calls its peers on the seal path (replicating each sealed input block to one
peer) and on the task path (fetching a block from its holders). Every such call has a
short deadline (:attr:`ops.config.Settings.peer_deadline_s`); a peer that misses it is
*suspect* for a while. Suspects are tried last, so a paused or wedged peer costs one
deadline, once, rather than one per block or per fetch, until the coordinator has declared
it lost (and sent assignments without it) or it answers again.

Pure decision logic: no sockets, and the clock is a parameter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable

__all__ = ["PeerHealth", "try_order"]


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
