"""Membership: which workers are in the fleet, their heartbeats, and who is lost.

The coordinator's view of its workers, fed by ``register`` and ``heartbeat`` calls and
by the monitor's :meth:`Membership.lost` check. A worker that registers is added to the
scheduler with the blocks it still holds (a worker outlives a coordinator); a lost one
is removed from it, which yields the instructions that rerun its tasks and re-replicate
its blocks. All methods are called with the coordinator's lock held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.scheduler import Instruction, Scheduler
from ops import metrics
from ops.protocol import EPOCH, Heartbeat, HeartbeatAnswer, Register, method_of
from ops.rpc import RpcClient

log = logging.getLogger("dstream.coordinator")

#: Calls to a worker wait this long by default; a worker slower than that is treated as
#: lost for that call (a seal: its partitions' records simply land in its next block).
CALL_TIMEOUT_S = 10.0


class WorkerClient:
    """The coordinator's client of one worker: every call carries the epoch it leads in.

    A worker refuses calls from an epoch older than the one it registered under, so a
    deposed coordinator that wakes up can neither seal, launch nor assign anything.
    """

    def __init__(self, client: RpcClient, epoch: int) -> None:
        self._client = client
        self.epoch = epoch

    def send(self, msg: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """Call the method that carries the :mod:`ops.protocol` message *msg*."""
        return self.call(method_of(msg), msg.to_wire(), timeout)

    def call(self, method: str, params: Any = None, timeout: float = CALL_TIMEOUT_S) -> Any:
        return self._client.call(method, {**(params or {}), EPOCH: self.epoch}, timeout)

    def close(self) -> None:
        self._client.close()


@dataclass
class WorkerInfo:
    """A live worker as the coordinator sees it (the heartbeat fields feed status)."""

    id: str
    slots: int
    client: WorkerClient
    last_seen: float
    received: int = 0
    store_bytes: int = 0
    blocks: int = 0
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    http_port: int = 0


class Membership:
    """The live workers of the fleet.

    Args:
        scheduler: told of every worker that joins (with its blocks) or is lost.
        connect: makes the client of a worker from its address (no I/O until a call).

    """

    def __init__(self, scheduler: Scheduler, connect: Callable[[str], WorkerClient]) -> None:
        self.scheduler = scheduler
        self.connect = connect
        self.workers: dict[str, WorkerInfo] = {}

    def register(self, msg: Register, now: float) -> bool:
        """Add a worker (idempotent: a known one is kept); True when it is new."""
        if msg.worker in self.workers:
            return False
        self.workers[msg.worker] = WorkerInfo(
            msg.worker, msg.slots, self.connect(msg.worker), now, http_port=msg.http_port
        )
        self.scheduler.add_worker(msg.worker, msg.slots)
        for bid in msg.blocks:
            self.scheduler.block_added(bid, msg.worker)
        log.info("worker %s joined (%d slots)", msg.worker, msg.slots)
        metrics.LIVE_WORKERS.set(len(self.workers))
        return True

    def heartbeat(self, msg: Heartbeat, now: float) -> HeartbeatAnswer:
        """Record a heartbeat; UNKNOWN tells a worker this coordinator does not know it."""
        w = self.workers.get(msg.worker)
        if w is None:
            return HeartbeatAnswer.UNKNOWN
        w.last_seen = now
        w.received = msg.received
        w.store_bytes = msg.store_bytes
        w.blocks = msg.blocks
        w.lag = dict(msg.lag)
        return HeartbeatAnswer.OK

    def heard_all(self, now: float) -> None:
        """Count every worker as heard at *now* (after this coordinator could not listen)."""
        for w in self.workers.values():
            w.last_seen = max(w.last_seen, now)

    def silent(self, now: float, limit_s: float) -> list[str]:
        """Workers not heard from for more than *limit_s* seconds (to be declared lost)."""
        return [w.id for w in self.workers.values() if now - w.last_seen > limit_s]

    def lose(self, wid: str) -> list[Instruction] | None:
        """Remove worker *wid*; the scheduler's instructions for its loss (None: unknown)."""
        w = self.workers.pop(wid, None)
        if w is None:
            return None
        log.warning("worker %s lost: reassigning its partitions, rerunning its tasks", wid)
        w.client.close()
        metrics.LIVE_WORKERS.set(len(self.workers))
        metrics.RECOVERIES.inc()
        return self.scheduler.remove_worker(wid)

    def get(self, wid: str) -> WorkerInfo | None:
        return self.workers.get(wid)

    def ids(self) -> list[str]:
        """Live worker ids, sorted (the order partition assignment and re-reads use)."""
        return sorted(self.workers)

    def __contains__(self, wid: object) -> bool:
        return wid in self.workers

    def __len__(self) -> int:
        return len(self.workers)

    def lag(self, wid: str, tp: tuple[str, int]) -> int | None:
        """Receiver lag of *tp* as its owner *wid* last reported it."""
        w = self.workers.get(wid)
        return None if w is None else w.lag.get(tp)

    def status(self, now: float) -> list[dict[str, Any]]:
        return [
            {
                "id": w.id,
                "slots": w.slots,
                "store_bytes": w.store_bytes,
                "blocks": w.blocks,
                "received": w.received,
                "http_port": w.http_port,
                "last_seen_s": round(now - w.last_seen, 3),
            }
            for w in self.workers.values()
        ]
