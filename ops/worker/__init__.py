"""The worker process: receivers, block store, task slots, sinks, behind one RPC server.

A worker registers with the coordinator, reads the Kafka partitions it is assigned, seals
and replicates blocks when the coordinator's clock says so, and runs the tasks it is sent.
Tasks fetch input blocks locally or from the peers the coordinator names. A worker holds
no authority: it never decides what to run or commit; it survives a coordinator restart
by re-registering (its blocks stay valid: they are immutable and named).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any

from engine.codec import encode_input_block
from engine.errors import DStreamError, FencedError, RpcError
from engine.executor import Executor
from engine.plan import Plan, block_batch, block_node, input_block_id
from ingest.receiver import Assignment, Receivers
from ops import faults, metrics, startup
from ops import protocol as wire
from ops.config import Settings
from ops.http import HttpEndpoints
from ops.leader_client import LeaderClient
from ops.protocol import COORDINATOR_CALLS, EPOCH
from ops.rpc import RpcClient
from ops.services import build_context, redis_client, rpc_client, rpc_server
from ops.sinks import FleetSinks
from ops.worker.membership import WorkerMembership
from ops.worker.peers import PeerHealth, PeerPool
from ops.worker.task_runner import TaskRunner
from state.blockstore import BlockStore
from state.checkpoint import RedisCheckpointStore
from state.metalog import OffsetRange

__all__ = ["COORDINATOR_CALLS", "STOP_DEADLINE_S", "Worker", "run_worker"]

log = logging.getLogger("dstream.worker")

#: After SIGTERM, running tasks get this long to finish before the process exits anyway
#: (well inside Kubernetes' default 30 s grace period; the coordinator reruns them).
STOP_DEADLINE_S = 15.0


class Worker:
    """One worker process (``dstream worker``): the RPC shell around its parts.

    The parts: :class:`ops.worker.membership.WorkerMembership` (register, heartbeat,
    rejoin, the commit lease), :class:`ops.worker.task_runner.TaskRunner` (task slots, fetches,
    commits, checkpoints) and the receivers (:mod:`ingest.receiver`); this class serves
    the wire protocol (:mod:`ops.protocol`) through a method -> handler table, and seals,
    replicates and re-reads input blocks.
    """

    def __init__(self, settings: Settings, app_path: str, app_id: str) -> None:
        self.settings = settings
        self.app_path = app_path
        self.app_id = app_id
        self.ssc = build_context(app_path, settings)
        self.store = BlockStore()
        self.receivers = Receivers(
            settings.kafka_client_config(**{"group.id": f"dstream-{app_id}-receivers"}),
            settings.max_records_per_partition,
        )
        self.server = rpc_server(settings, self._handle, port=settings.rpc_port, name="worker")
        self.coordinator = LeaderClient(settings)
        #: clients of the peer workers, with bounded open connections (idle ones closed)
        self.peer_pool: PeerPool[RpcClient] = PeerPool(
            lambda addr: rpc_client(settings, addr), settings.peer_connections
        )
        self.peer_ids: list[str] = []
        #: peers that missed a deadline lately (tried last when replicating or fetching)
        self.peer_health = PeerHealth(settings.heartbeat_timeout)
        self.plan: Plan | None = None
        self.queue_parts: dict[int, int] = {}  # queue source node -> assigned
        self.id = ""
        self.stopping = threading.Event()
        #: set when the coordinator says a bounded run finished (``finish``): exit 0
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self.membership = WorkerMembership(
            settings,
            self.coordinator,
            self.store,
            self.receivers,
            self.stopping,
            worker_id=lambda: self.id,
            http_port=lambda: self.http.port,
            on_joined=self._joined,
        )
        #: the app's incarnation id, from the leader's registration reply (commit markers)
        self.app_incarnation = ""
        self.sinks = FleetSinks(
            settings,
            app_id,
            epoch_fn=lambda: self.epoch,
            incarnation_fn=lambda: self.app_incarnation,
        )
        self.tasks = TaskRunner(
            settings,
            self.store,
            self.coordinator,
            self._peer,
            RedisCheckpointStore(redis_client(settings), app_id),
            self.sinks,
            worker_id=lambda: self.id,
            leased=self.membership.leased,
            stopping=self.stopping,
            peer_health=self.peer_health,
        )
        #: the method -> handler table (calls from the coordinator and from peers)
        self.handlers: wire.Handlers = {
            "fetch": lambda p: self._fetch_block(wire.Fetch.from_wire(p)),
            "launch": lambda p: self.tasks.launch(
                wire.Launch.from_wire(p), self.membership.incarnation
            ),
            "replicate": lambda p: self._replicate(wire.Replicate.from_wire(p)),
            "seal": lambda p: [r.to_wire() for r in self._seal(wire.Seal.from_wire(p))],
            "read_input": lambda p: self._read_input(wire.ReadInput.from_wire(p)),
            "replicate_to": lambda p: self._replicate_to(wire.ReplicateTo.from_wire(p)),
            "assign": lambda p: self._assign(wire.Assign.from_wire(p)),
            "free": lambda p: self._free(wire.Free.from_wire(p)),
            "cancel": lambda p: self.tasks.cancel(wire.Cancel.from_wire(p)),
            "finish": lambda p: self._finish(wire.Finish.from_wire(p)),
            "query_part": lambda p: self._query_part(wire.QueryPartition.from_wire(p)),
            "await_load": lambda p: [
                wire.TableLoad(*t).to_wire()
                for t in self.receivers.wait_loaded(wire.AwaitLoad.from_wire(p).wait_s)
            ],
            "ping": lambda _p: self.id,
        }

    @property
    def epoch(self) -> int:
        """The leader's epoch this worker registered under (older calls are refused)."""
        return self.membership.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.membership.epoch = value

    @property
    def first(self) -> int:
        return self.membership.first

    def _joined(self, reply: wire.RegisterReply) -> None:
        """Registered: build the plan and the executor once (the graph never changes)."""
        self.app_incarnation = reply.incarnation
        if self.plan is None:
            self.plan = Plan(self.ssc.nodes, {k: len(v) for k, v in reply.layout.items()})
            self.tasks.configure(
                self.plan,
                Executor(
                    self.plan, reply.first, self.ssc.batch_interval_ms, self.settings.fail_on_error
                ),
            )

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Serve RPC and HTTP, then join the fleet in the background.

        Returns at once: registration (which waits for a coordinator, for as long as it
        takes) and heartbeats run on the ``membership`` thread, so a SIGTERM is handled at
        any point of the worker's life. The worker is ready once registered.
        """
        self.server.start()
        host, port = self.server.address
        adv = self.settings.advertise_host or (
            host if host not in ("0.0.0.0", "") else socket.gethostname()  # noqa: S104
        )
        self.id = f"{adv}:{port}"
        self.http = HttpEndpoints(
            self.settings.bind_host,
            self.settings.http_port_for("worker"),
            live=lambda: not self.stopping.is_set() and not self.receivers.errors,
            ready=lambda: self.plan is not None and not self.stopping.is_set(),
        ).start()
        self.peer_pool.start()
        log.info(
            "worker %s up (app %s, %d slots, rpc :%d, http :%d); joining coordinator %s",
            self.id,
            self.app_id,
            self.settings.task_slots,
            port,
            self.http.port,
            self.settings.coordinator,
        )
        self._membership = threading.Thread(target=self.membership.run, name="membership")
        self._membership.daemon = True
        self._membership.start()

    def stop(self, deadline_s: float = STOP_DEADLINE_S) -> bool:
        """Stop serving and release everything; idempotent.

        Running tasks get until *deadline_s* after the call to finish (the coordinator
        reruns whatever does not); returns False when some did not finish by then. Called
        from the main thread after SIGTERM, well inside a pod's grace period.
        """
        if self.stopping.is_set():
            return True
        self.stopping.set()
        end = time.monotonic() + deadline_s
        self.receivers.stop()
        if getattr(self, "http", None) is not None:
            self.http.stop()
        self.tasks.shutdown()
        clean = _join_all(self.tasks.threads(), end)
        self.server.stop()
        self.coordinator.close()
        self.peer_pool.close()
        self.sinks.close()
        return clean

    # -- rpc -------------------------------------------------------------------------------
    def _handle(self, method: str, params: Any, peer: Any) -> Any:
        """Serve one call; a coordinator's call from an older epoch is refused first."""
        if method in COORDINATOR_CALLS:
            epoch = params.get(EPOCH)
            if epoch is not None and epoch < self.epoch:
                # a deposed coordinator (paused past its lease, then woken): refuse it
                metrics.FENCED.labels(role="worker").inc()
                msg = f"{method} from epoch {epoch} refused: the leader's epoch is {self.epoch}"
                raise FencedError(msg)
        handler = self.handlers.get(method)
        if handler is None:
            msg = f"unknown method {method}"
            raise DStreamError(msg)
        return handler(params)

    def _fetch_block(self, msg: wire.Fetch) -> Any:
        return self.store.get_bytes(msg.block, msg.bucket)

    def _replicate(self, msg: wire.Replicate) -> bool:
        self.store.put(msg.block, msg.data, replace=msg.block.startswith("in/"))
        return True

    def _replicate_to(self, msg: wire.ReplicateTo) -> int:
        """Copy a block to the peer the coordinator names (a second holder after a loss).

        Raises:
            RpcError: the target did not acknowledge within the peer deadline; the
                coordinator sees the failure and the block keeps the holders it has.

        """
        data = self.store.get_bytes(msg.block)
        try:
            self._peer(msg.target).call(
                "replicate",
                wire.Replicate(msg.block, data).to_wire(),
                timeout=self.settings.peer_deadline_s,
            )
        except RpcError:
            self.peer_health.missed(msg.target)
            raise
        self.peer_health.answered(msg.target)
        return len(data)

    def _replicate_block(self, bid: str, data: bytes, failed: set[str]) -> list[str]:
        """Copy a sealed block to one peer; the peers that acknowledged it (0 or 1).

        The peer the coordinator assigned is tried first unless it missed a deadline
        lately (:class:`ops.worker.peers.PeerHealth`); each call waits at most
        ``Settings.peer_deadline_s``, then the next peer is tried. A peer that failed
        during this seal (*failed*, updated here) is not tried again in it, so a paused
        peer costs a seal one deadline at most. With no peer acknowledging, the block
        stays with this worker alone and the report says so: a lost block is re-read from
        Kafka by its logged offset range.
        """
        for peer in self.peer_health.order(self.peer_ids, skip=failed):
            try:
                self._peer(peer).call(
                    "replicate",
                    wire.Replicate(bid, data).to_wire(),
                    timeout=self.settings.peer_deadline_s,
                )
            except RpcError as e:
                failed.add(peer)
                self.peer_health.missed(peer)
                log.warning("replicating %s to %s failed (trying the next peer): %s", bid, peer, e)
                continue
            self.peer_health.answered(peer)
            return [peer]
        return []

    def _free(self, msg: wire.Free) -> int:
        self.store.free(msg.blocks)
        return len(self.store)

    def _peer(self, addr: str) -> RpcClient:
        return self.peer_pool.get(addr)

    def _finish(self, msg: wire.Finish) -> bool:
        """A bounded run finished (all its batches committed): stop, and exit 0."""
        log.info("the bounded run finished (%d records, %d batches)", msg.records, msg.batches)
        self.finished.set()
        return True

    def _query_part(self, msg: wire.QueryPartition) -> dict[str, Any]:
        """Select from one partition of a queryable stream at a batch (``dstream query``).

        Reads the partition's blocks as a task would (here, from the holders named, or the
        checkpoint); raises :class:`engine.executor.BlockMissing` when one is gone, and the
        coordinator asks elsewhere. Changes nothing.
        """
        from engine.query import read_partition, select

        plan, executor = self.tasks.plan, self.tasks.executor
        if plan is None or executor is None:
            msg_ = "not registered yet: no plan to read state with"
            raise DStreamError(msg_)
        node = plan.by_id[msg.node]
        items = read_partition(
            executor, node, msg.batch, msg.part, self.tasks.fetcher(msg.locations)
        )
        kind = "window" if node.kind == "window" else "state"
        entries, more = select(kind, items, msg.keys, msg.prefix, msg.limit)
        return {"items": entries, "more": more}

    def _assign(self, msg: wire.Assign) -> bool:
        """Read exactly the partitions of *msg* from their start offsets (replaces all)."""
        parts = []
        self.queue_parts = {}
        for a in msg.parts:
            n = self.ssc.nodes[a.node]
            if n.args["source"] == "queue":
                self.queue_parts[a.node] = a.index
                continue
            parts.append(
                Assignment(
                    a.node,
                    a.index,
                    a.topic,
                    a.partition,
                    a.start,
                    bool(n.args.get("with_metadata")),
                    a.stop,
                    a.load_until,
                )
            )
        self.receivers.assign(parts)
        self.peer_ids = [p for p in msg.peers if p != self.id]
        if msg.max_records is not None:
            self.receivers.max_records = msg.max_records
        return True

    def _seal(self, msg: wire.Seal) -> list[wire.BlockReport]:
        """Seal batch *msg.batch*'s blocks, replicate each to a peer, then report them.

        Replication waits on no peer longer than ``Settings.peer_deadline_s``, and on a
        paused peer once per seal (see :meth:`_replicate_block`).
        """
        if msg.max_records is not None:
            self.receivers.max_records = msg.max_records
        b = msg.batch
        reports: list[wire.BlockReport] = []
        blocks = [
            (s.block_id, OffsetRange(s.topic, s.partition, s.start, s.until, s.count), s.data)
            for s in self.receivers.seal(b)
        ]
        for node, index in self.queue_parts.items():
            data, count = self._queue_block(node, b)
            blocks.append(
                (input_block_id(node, b, index), OffsetRange("", 0, b, b + 1, count), data)
            )
        failed: set[str] = set()
        for bid, rng, data in blocks:
            self.store.put(bid, data, replace=True)
            holders = [self.id, *self._replicate_block(bid, data, failed)]
            if rng.topic:
                metrics.INPUT_RECORDS.labels(topic=rng.topic, partition=str(rng.partition)).inc(
                    rng.records
                )
            reports.append(wire.BlockReport(bid, rng, len(data), holders))
        return reports

    def _queue_block(self, node: int, b: int) -> tuple[bytes, int]:
        n = self.ssc.nodes[node]
        i = b - self.first
        values = n.args["batches"][i] if 0 <= i < len(n.args["batches"]) else n.args["default"]
        return encode_input_block("", 0, b, b + 1, list(values)), len(values)

    def _read_input(self, msg: wire.ReadInput) -> int:
        """Rebuild a lost input block from Kafka by its logged offset range (or the queue)."""
        bid, rng = msg.block, msg.range
        node = block_node(bid)
        if not rng.topic:
            data, _ = self._queue_block(node, block_batch(bid))
        else:
            from ingest.reread import read_range

            n = self.ssc.nodes[node]
            data = read_range(
                self.settings.kafka_client_config(**{"group.id": f"dstream-{self.app_id}-reread"}),
                rng.topic,
                rng.partition,
                rng.start,
                rng.until,
                bool(n.args.get("with_metadata")),
            )
        faults.crash_point("during_recovery")
        return self.store.put(bid, data, replace=True)


def _join_all(threads: list[threading.Thread], end: float) -> bool:
    """Join *threads* until the monotonic time *end*; True when all of them finished."""
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return not any(t.is_alive() for t in threads)


def run_worker(
    settings: Settings, app_path: str, app_id: str, stop_deadline_s: float = STOP_DEADLINE_S
) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the exit code (0: asked to stop).

    The signal handlers are installed before anything else, and the main thread only
    waits: a signal is handled at any point, before registration, during a batch, or with
    no coordinator. Tasks still running *stop_deadline_s* after the signal are abandoned.
    Once it serves, the worker checks the Kafka and Redis its app needs
    (:func:`ops.startup.wait_for_dependencies`).

    Raises:
        ops.startup.DependencyUnreachable: Kafka or Redis did not answer within
            ``startup_timeout``; the worker stopped, the message is one line.

    """
    if not settings.metrics:
        metrics.disable()
    done = threading.Event()

    def _stop(_sig: int, _frm: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    w = Worker(settings, app_path, app_id)
    if done.is_set():
        return 0
    w.start()
    deps = startup.app_dependencies(settings, w.ssc.nodes, app_id, coordinator=False)
    try:  # serving its probes meanwhile: alive, not ready until it registered
        startup.wait_for_dependencies(settings, deps, done)
    except startup.DependencyUnreachable:
        w.stop(stop_deadline_s)
        raise
    while not done.wait(0.2):
        if w.finished.is_set():  # a bounded run finished: exit 0, like a finished job
            break
    log.info("worker %s stopping", w.id)
    if not w.stop(stop_deadline_s):
        log.warning("tasks still running after %.0f s abandoned (they are rerun)", stop_deadline_s)
    log.info("worker %s stopped", w.id)
    return 0
