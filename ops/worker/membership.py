"""A worker's membership: registering with the leader, heartbeats, rejoining.

:class:`WorkerMembership` runs the worker's ``membership`` thread. It registers (with
the blocks the worker still holds), heartbeats every ``heartbeat_interval``, and rejoins
when the coordinator answers ``unknown`` (declared lost, or a new leader). It also keeps
the lease a worker's commits depend on (:meth:`leased`): a worker that has not heard
from its coordinator for ``heartbeat_interval * heartbeat_misses`` commits nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.errors import RpcError
from ingest.receiver import Receivers
from ops import metrics
from ops import protocol as wire
from ops.config import Settings
from ops.leader_client import LeaderClient
from ops.rpc import RpcTimeout
from state.blockstore import BlockStore

log = logging.getLogger("dstream.worker")

#: A registration call waits this long (a paused coordinator accepts but never answers).
REGISTER_TIMEOUT_S = 5.0
#: Registration retries back off up to this: a standby about to lead is joined soon after.
REGISTER_BACKOFF_MAX_S = 0.25
#: While the coordinator stays unreachable, say so this often (and once at once).
UNREACHABLE_LOG_EVERY_S = 30.0
#: How often a worker hands freed heap pages back to the OS (see :func:`release_free_memory`).
TRIM_EVERY_S = 10.0


def _load_malloc_trim() -> Any:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to do
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Blocks are large byte strings, allocated and freed every batch by several threads;
    glibc keeps what they free in per-thread arenas, so without this a worker's RSS
    creeps up over hours although the block store stays the same size.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class WorkerMembership:
    """Registration, heartbeats and the commit lease of one worker.

    Args:
        settings: heartbeat interval and misses, slots, the coordinator's addresses.
        coordinator: the client of the leading coordinator.
        store: the block store (its blocks are named at registration).
        receivers: paused while no coordinator answers; their lag is reported.
        stopping: the worker's stop event.
        worker_id: this worker's address; *http_port* its HTTP port.
        on_joined: called with every registration reply (the worker builds its plan).

    """

    def __init__(
        self,
        settings: Settings,
        coordinator: LeaderClient,
        store: BlockStore,
        receivers: Receivers,
        stopping: threading.Event,
        worker_id: Callable[[], str],
        http_port: Callable[[], int],
        on_joined: Callable[[wire.RegisterReply], None],
    ) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.store = store
        self.receivers = receivers
        self.stopping = stopping
        self.worker_id = worker_id
        self.http_port = http_port
        self.on_joined = on_joined
        #: the leader's epoch this worker registered under (older calls are refused)
        self.epoch = 0
        self.first = 0
        #: bumped when the coordinator no longer knows this worker (it was declared lost):
        #: tasks launched under an older incarnation must not commit
        self.incarnation = 0
        self.last_ok = time.monotonic()
        self.lease = settings.heartbeat_interval * settings.heartbeat_misses

    def leased(self, incarnation: int) -> bool:
        """Whether this worker may still commit for tasks of *incarnation*.

        False once the coordinator declared it lost, and as soon as its last acknowledged
        heartbeat is older than the lease (a paused process finds this out on waking,
        before it could commit anything).
        """
        return incarnation == self.incarnation and time.monotonic() - self.last_ok < self.lease

    def run(self) -> None:
        """The ``membership`` thread: register, then heartbeat until the worker stops."""
        if self.register():
            self.heartbeat_loop()

    def register(self) -> bool:
        """Register with the coordinator, retrying until it answers or the worker stops.

        An unreachable coordinator is logged at warning level once, then every
        :data:`UNREACHABLE_LOG_EVERY_S` while it stays unreachable. Returns False when the
        worker was stopped first.
        """
        delay = 0.05
        warned_at: float | None = None
        while not self.stopping.is_set():
            try:
                msg = wire.Register(
                    self.worker_id(), self.settings.task_slots, self.store.ids(), self.http_port()
                )
                reply = wire.RegisterReply.from_wire(
                    self.coordinator.call("register", msg.to_wire(), timeout=REGISTER_TIMEOUT_S)
                )
                break
            except RpcError as e:
                now = time.monotonic()
                if warned_at is None or now - warned_at >= UNREACHABLE_LOG_EVERY_S:
                    warned_at = now
                    log.warning(
                        "no leading coordinator at %s (%s); retrying", self.settings.coordinator, e
                    )
                if self.stopping.wait(delay):
                    return False
                delay = min(REGISTER_BACKOFF_MAX_S, delay * 2)
        else:
            return False
        if self.epoch and reply.epoch != self.epoch:
            log.info("joined a new coordinator (epoch %d -> %d)", self.epoch, reply.epoch)
        self.epoch = reply.epoch
        self.first = reply.first
        self.last_ok = time.monotonic()
        self.on_joined(reply)
        return True

    def heartbeat_loop(self) -> None:
        """Heartbeat until stopped; rejoin a coordinator that does not know this worker.

        A coordinator that stops or dies leaves this worker running with its blocks: while
        none answers, receiving pauses (batches are only cut on a coordinator's clock) once
        the lease has run out, and the next coordinator's ``unknown`` answer makes the
        worker register again (with its blocks), under the new epoch.
        """
        iv = self.settings.heartbeat_interval
        trimmed = time.monotonic()
        orphaned = False
        while not self.stopping.wait(iv):
            if time.monotonic() - trimmed >= TRIM_EVERY_S:
                trimmed = time.monotonic()
                release_free_memory()
            try:
                beat = wire.Heartbeat(
                    self.worker_id(),
                    self.store.nbytes,
                    len(self.store),
                    self.receivers.received,
                    dict(self.receivers.lag),
                )
                reply = self.coordinator.call("heartbeat", beat.to_wire(), timeout=iv * 4)
                metrics.BLOCK_STORE_BYTES.set(self.store.nbytes)
                for (t, p), n in self.receivers.lag.items():
                    metrics.RECEIVER_LAG.labels(topic=t, partition=str(p)).set(n)
                metrics.BLOCK_STORE_BLOCKS.set(len(self.store))
                if reply == wire.HeartbeatAnswer.UNKNOWN:
                    # declared lost (paused, partitioned) or a new coordinator: rejoin
                    self.incarnation += 1
                    self.receivers.assign([])
                    log.warning(
                        "worker %s is unknown to the coordinator (declared lost, or a new "
                        "coordinator); rejoining",
                        self.worker_id(),
                    )
                    if not self.register():
                        return
                    orphaned = False
                elif orphaned:
                    # the same coordinator is back: register again so that it resends
                    # this worker's partitions (its receivers were paused)
                    if not self.register():
                        return
                    orphaned = False
                else:
                    self.last_ok = time.monotonic()
            except RpcError as e:
                log.debug("heartbeat failed: %s", e)
                if isinstance(e, RpcTimeout):
                    # a heartbeat is answered at once: the path (or the coordinator) is
                    # gone. A fresh connection finds a healed path within a connect's SYN
                    # retries; the old one only at TCP's next retransmission, seconds later
                    self.coordinator.reset()
                if not orphaned and time.monotonic() - self.last_ok > self.lease:
                    orphaned = True
                    # no coordinator: stop reading (nothing will seal it); keep the blocks
                    self.receivers.assign([])
                    log.warning(
                        "coordinator %s lost (%s); keeping %d blocks, waiting for the next one",
                        self.settings.coordinator,
                        e,
                        len(self.store),
                    )
