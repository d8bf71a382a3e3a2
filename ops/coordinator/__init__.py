"""The coordinator: a thin composition of roles around the pure scheduler.

Each role is a class of its own, built with its collaborators and unit-tested without
services:

* :class:`.leadership.LeaderElection` - the Redis lease, the epoch, stepping down;
* :class:`.membership.Membership` - workers, heartbeats, lost workers;
* :class:`.receivers.ReceiverTracker` - positions, partition assignment, offset ranges;
* :class:`.batch_clock.BatchClock` - seal, log the ranges, then schedule each batch;
* :class:`.dispatch.Dispatcher` - scheduler instructions to RPCs, task reports back;
* :class:`.completion.Completion` - batches done, checkpoints in force, lineage pruned;
* :class:`.rate_control.RateController` - backpressure, a listener of completed batches;
* :mod:`.status` - status;
* :class:`.leader.Leader` - the roles above wired together while this process leads.

The :class:`Coordinator` does the I/O of start-up (the app, the Kafka layout, Redis,
the listener), serves the wire protocol (:mod:`ops.protocol`) through a method -> handler
table, and builds the leader's roles when it takes the lease.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.errors import DStreamError, NotLeaderError
from engine.plan import Plan
from engine.scheduler import tune_gc
from ops.config import Settings
from ops.coordinator.durable import DurableWriter
from ops.coordinator.leader import Leader, status_of
from ops.coordinator.leadership import LeaderElection
from ops.coordinator.membership import WorkerClient
from ops.coordinator.status import standby_status
from ops.http import HttpEndpoints
from ops.services import (
    build_context,
    redis_client,
    rpc_client,
    rpc_server,
    source_layout,
    topic_partitions,
)
from state.checkpoint import RedisCheckpointStore
from state.metalog import Lease, MetaLog, RedisMetaLog

log = logging.getLogger("dstream.coordinator")

#: Exit code of a coordinator whose app failed (fail_on_error): not restarted.
APP_FAILED = 3
#: Exit code of a coordinator that lost the lease to another: restarted, as a standby.
LOST_LEADERSHIP = 4


class Coordinator:
    """One coordinator process (``dstream coordinator``): leader or standby."""

    def __init__(
        self,
        settings: Settings,
        app_path: str,
        app_id: str,
        expect_workers: int = 1,
        metalog: MetaLog | None = None,
    ) -> None:
        self.settings = settings
        self.app_id = app_id
        self.ssc = build_context(app_path, settings)
        self.expect_workers = expect_workers
        topics = sorted(
            {
                t
                for n in self.ssc.nodes
                if n.kind == "source" and n.args["source"] == "kafka"
                for t in n.args["topics"]
            }
        )
        counts = topic_partitions(settings, topics) if topics else {}
        self.layout = source_layout(self.ssc, counts)
        self.plan = Plan(self.ssc.nodes, {k: len(v) for k, v in self.layout.items()})
        self.metalog = metalog or RedisMetaLog(redis_client(settings), app_id)
        self.checkpoint_store = RedisCheckpointStore(redis_client(settings), app_id)
        self.failed: str | None = None
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.io = ThreadPoolExecutor(8, thread_name_prefix="coord-io")
        self.server = rpc_server(
            settings, self._handle, port=settings.coordinator_port, name="coordinator"
        )
        self._holder = ""
        self.election = LeaderElection(
            self.metalog,
            lambda: self.holder,
            settings.lease_seconds,
            self.stopping,
            on_lead=self._take_over,
            on_leading=self._start_leading,
        )
        self.durable = DurableWriter(self.stopping, self.election.step_down)

    # -- taking the lead -------------------------------------------------------------------
    def _take_over(self, lease: Lease) -> None:
        """Build the leader's roles from the metadata log (on the election thread).

        The graph, the plan and the Kafka partition layout were built at start-up, so a
        standby taking over only reads what the last leader logged; the batches it logged
        but did not finish are replayed by the clock.
        """
        resume = Leader.load(self.metalog, lease.epoch)
        positions = Leader.positions(self.layout, resume, self._first_offsets)
        settings = self.settings
        self.leader = Leader(
            settings=settings,
            app_id=self.app_id,
            holder=self.holder,
            plan=self.plan,
            layout=self.layout,
            interval_ms=self.ssc.batch_interval_ms,
            expect_workers=self.expect_workers,
            resume=resume,
            positions=positions,
            metalog=self.metalog,
            checkpoints=self.checkpoint_store,
            durable=self.durable,
            connect=lambda wid: WorkerClient(rpc_client(settings, wid), lease.epoch),
            io=self.io,
            lock=self.lock,
            stopping=self.stopping,
            may_act=self.election.may_act,
            fail_app=self._fail,
            http_port=lambda: self.http.port if getattr(self, "http", None) else None,
        )

    def _fail(self, error: str) -> None:
        """fail_on_error: the app stops with the error and the record's coordinates."""
        self.failed = error
        self.stopping.set()

    def _first_offsets(self, need: list[tuple[int, int, str, int]]) -> dict[tuple[int, int], int]:
        """Where Kafka partitions the log does not cover start: earliest, or latest."""
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer(
            self.settings.kafka_client_config(
                **{"group.id": f"dstream-{self.app_id}-coordinator", "enable.auto.commit": False}
            )
        )
        pos = {}
        try:
            for node, index, topic, part in need:
                lo, hi = c.get_watermark_offsets(TopicPartition(topic, part), timeout=30)
                latest = self.ssc.nodes[node].args.get("start") == "latest"
                pos[(node, index)] = hi if latest else lo
        finally:
            c.close()
        return pos

    def _start_leading(self) -> None:
        log.info(
            "coordinator %s leads (app %s, epoch %d, resuming at batch %d)",
            self.holder,
            self.app_id,
            self.epoch,
            self.leader.clock.next_batch,
        )
        self.leader.start()

    # -- what tests and tools read ---------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.election.epoch

    @property
    def deposed(self) -> bool:
        return self.election.deposed

    @property
    def refused(self) -> int:
        return self.election.refused

    @property
    def workers(self) -> dict[str, Any]:
        """The live workers (empty before this coordinator leads)."""
        return self.leader.membership.workers if self.holds_lease() else {}

    @property
    def done(self) -> int | None:
        """The highest batch up to which everything completed (None before leading)."""
        return self.leader.completion.done if self.holds_lease() else None

    @property
    def next_batch(self) -> int:
        return self.leader.clock.next_batch

    def holds_lease(self) -> bool:
        """Whether this coordinator took the lease and was not deposed (it may be in doubt)."""
        return self.election.holds_lease()

    def leads(self) -> bool:
        """Whether this coordinator may act as the leader right now (see LeaderElection)."""
        return self.election.leads()

    def wait_leading(self, timeout: float) -> bool:
        """Block until this coordinator leads (tests, tools); False after *timeout*."""
        return self.election.leading.wait(timeout)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def holder(self) -> str:
        """The coordinator's name on the lease: the RPC address workers can reach it at.

        Only one live process can hold an address (it is bound), so a coordinator that
        finds its own address on the lease is a restart of a dead one.
        """
        if not self._holder:  # once, while the listener is bound (it is closed at stop)
            host, port = self.server.address
            adv = self.settings.advertise_host or (
                host if host not in ("0.0.0.0", "::", "") else socket.gethostname()  # noqa: S104
            )
            self._holder = f"{adv}:{port}"
        return self._holder

    def start(self) -> None:
        """Serve RPC and HTTP, then compete for the lease on the ``election`` thread.

        Ready (``/readyz``) only while leading: a standby is alive but not ready, so a
        Service routes workers and clients to the leader alone.
        """
        self.server.start()
        _ = self.holder
        self.http = HttpEndpoints(
            self.settings.bind_host,
            self.settings.http_port_for("coordinator"),
            live=lambda: not self.stopping.is_set(),
            # readiness never waits for another pod: holding the lease and serving is
            # enough (a redis blip that puts the lease in doubt does not unroute it)
            ready=lambda: self.holds_lease() and not self.stopping.is_set(),
            status=self.status,
        ).start()
        log.info(
            "coordinator %s up on %s:%d (app %s); waiting for the lease",
            self.holder,
            *self.server.address,
            self.app_id,
        )
        threading.Thread(target=self.election.run, name="election", daemon=True).start()

    def stop(self) -> None:
        """Stop scheduling and serving, and hand the lease over. The workers keep running.

        They re-register with the next leader (a standby, or this one restarted) with
        their blocks, so a coordinator upgrade or a node drain is a pause of a few batches,
        not an outage.
        """
        self.stopping.set()
        led = self.election.lease is not None
        self.election.release()
        if led:
            self.leader.close()
        self.io.shutdown(wait=False, cancel_futures=True)
        self.server.stop()
        if getattr(self, "http", None) is not None:
            self.http.stop()

    # -- rpc -------------------------------------------------------------------------------
    def _handle(self, method: str, params: Any, peer: Any) -> Any:
        """Serve one call: a standby answers status only; the leader its handler table."""
        if not self.holds_lease():
            if method == "status":
                return self.status()
            leader = self.metalog.leader()
            hint = leader.holder if leader and leader.holder != self.holder else ""
            raise NotLeaderError(self.holder, hint)
        if method == "status":
            return self.status()
        handler = self.leader.handlers.get(method)
        if handler is None:
            msg = f"unknown method {method}"
            raise DStreamError(msg)
        return handler(params)

    def status(self) -> dict[str, Any]:
        """The leader's view of batches, workers and receivers (a standby's: the leader)."""
        if not self.holds_lease():
            return standby_status(self.app_id, self.holder, self.election)
        return status_of(self.leader)


def run_coordinator(settings: Settings, app_path: str, app_id: str, expect_workers: int) -> int:
    """Run a coordinator until SIGTERM/SIGINT, app failure or deposition; the exit code."""
    c = Coordinator(settings, app_path, app_id, expect_workers)
    tune_gc()
    done = threading.Event()

    def _stop(_sig: int, _frm: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    c.start()
    while not done.wait(0.2):
        if c.failed is not None or c.deposed:
            break
    c.stop()
    if c.deposed:
        return LOST_LEADERSHIP
    return APP_FAILED if c.failed is not None else 0
