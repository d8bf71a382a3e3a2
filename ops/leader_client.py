"""A client of whichever coordinator leads, given every coordinator's address.

Outside Kubernetes there is no Service in front of the coordinators: workers and tools
take the comma-separated list of their addresses (as Spark standalone workers take
``spark://h1:7077,h2:7077``) and follow the leader. A call that reaches a standby fails
with :class:`engine.errors.NotLeaderError` naming the leader, and one that reaches no
process (a dead or paused coordinator) fails with a connection error; either way the
client moves on, to the named leader when it is in the list, else to the next address,
and the caller's usual retry lands there.
"""

from __future__ import annotations

import threading
from typing import Any

from engine.errors import NotLeaderError
from ops.config import Settings
from ops.rpc import ConnectionLost, RemoteError, RpcClient, RpcTimeout
from ops.services import rpc_client


class LeaderClient:
    """Calls the leading coordinator among ``settings.coordinator_addresses``.

    Thread-safe; with one address it behaves as a plain :class:`ops.rpc.RpcClient`.
    """

    def __init__(self, settings: Settings) -> None:
        self.addresses = settings.coordinator_addresses
        self._clients: list[RpcClient] = [rpc_client(settings, a) for a in self.addresses]
        self._current = 0
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._current]

    def call(self, method: str, params: Any = None, timeout: float = 10.0) -> Any:
        """Call *method* on the current coordinator; on a miss, move on and raise.

        Raises:
            NotLeaderError: the coordinator called does not lead (the next call goes to
                the leader it named, or to the next address).
            RpcError: as :meth:`ops.rpc.RpcClient.call` (connection errors move on too).

        """
        with self._lock:
            i = self._current
        try:
            return self._clients[i].call(method, params, timeout=timeout)
        except RemoteError as e:
            if e.type_name != NotLeaderError.__name__:
                raise
            leader = _named_leader(e.message)
            self._move(i, leader)
            raise NotLeaderError(self.addresses[i], leader) from e
        except (ConnectionLost, RpcTimeout):
            self._move(i, "")
            raise

    def _move(self, failed: int, leader: str) -> None:
        with self._lock:
            if self._current != failed:
                return  # another thread moved on already
            if leader in self.addresses:
                self._current = self.addresses.index(leader)
            else:
                self._current = (failed + 1) % len(self.addresses)

    def reset(self) -> None:
        """Drop every coordinator connection (:meth:`ops.rpc.RpcClient.reset`)."""
        for c in self._clients:
            c.reset()

    def close(self) -> None:
        for c in self._clients:
            c.close()


def _named_leader(message: str) -> str:
    """The leader's address in a :class:`NotLeaderError` message ("" when unknown)."""
    _, sep, rest = message.rpartition("the leader is ")
    return rest.strip() if sep and rest.strip() != "unknown" else ""
