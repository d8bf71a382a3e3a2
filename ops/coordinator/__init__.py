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
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from engine.errors import ConfigError, DStreamError, MetadataLostError, NotLeaderError
from engine.plan import Plan
from engine.scheduler import tune_gc
from ops import metrics, startup
from ops.config import Settings
from ops.coordinator.durable import DurableWriter
from ops.coordinator.leader import Leader, status_of
from ops.coordinator.leadership import LeaderElection
from ops.coordinator.membership import WorkerClient
from ops.coordinator.status import standby_status
from ops.http import HttpEndpoints
from ops.markers import check_markers, find_markers
from ops.services import (
    build_context,
    redis_client,
    rpc_client,
    rpc_server,
    source_layout,
    topic_partitions,
)
from ops.topics import ensure_output_topics
from state.checkpoint import RedisCheckpointStore
from state.metalog import Lease, MetaLog, RedisMetaLog

log = logging.getLogger("dstream.coordinator")

#: Exit code of a coordinator whose app failed (fail_on_error): not restarted.
APP_FAILED = 3
#: Exit code of a coordinator that lost the lease to another: restarted, as a standby.
LOST_LEADERSHIP = 4
#: Exit code of a coordinator that found the app's Redis metadata lost (or another run's):
#: restarting does not help; restore Redis or run ``dstream reset`` (docs/operations.md).
METADATA_LOST = 5

T = TypeVar("T")


class _FatalOnLost(DurableWriter):
    """A :class:`DurableWriter` that reports lost metadata to the coordinator at once.

    The batch clock's and completion's fenced writes all go through it, so the first write
    after the metadata vanished (within one batch) stops the coordinator.
    """

    def __init__(
        self,
        stopping: threading.Event,
        on_fenced: Callable[[], None],
        on_lost: Callable[[str], None],
    ) -> None:
        super().__init__(stopping, on_fenced)
        self.on_lost = on_lost

    def write(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return super().write(what, fn, *args)
        except MetadataLostError as e:
            self.on_lost(str(e))
            raise


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
        # Kafka and Redis answer, or one line each and (at startup_timeout) one error line;
        # Redis is not needed when a metadata log is given (tests)
        deps = startup.app_dependencies(settings, self.ssc.nodes, app_id, coordinator=True)
        if metalog is not None:
            deps = [d for d in deps if d.name != "redis"]
        startup.wait_for_dependencies(settings, deps)
        counts = topic_partitions(settings, topics) if topics else {}
        ensure_output_topics(settings, self.ssc.nodes, app_id)
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
        self.durable = _FatalOnLost(
            self.stopping, self.election.step_down, self.election.metadata_lost
        )
        #: whether the app reads or writes Kafka (only then can it have commit markers)
        self.uses_kafka = bool(topics) or any(
            n.kind == "output" and n.args.get("sink") == "kafka" for n in self.ssc.nodes
        )

    # -- taking the lead -------------------------------------------------------------------
    def _take_over(self, lease: Lease) -> None:
        """Build the leader's roles from the metadata log (on the election thread).

        The graph, the plan and the Kafka partition layout were built at start-up, so a
        standby taking over only reads what the last leader logged; the batches it logged
        but did not finish are replayed by the clock.

        First the start check: the commit markers in Kafka must belong to the incarnation in
        Redis and be no further than its log; with no metadata in Redis there must be none
        (else its data was lost: :class:`MetadataLostError`, fatal). A fresh app gets its
        incarnation id here.
        """
        incarnation = self.metalog.incarnation()
        if self.uses_kafka:
            done = self.metalog.done()
            logged = [*self.metalog.logged(), *([] if done is None else [done])]
            markers = find_markers(self.settings, self.app_id)
            check_markers(self.app_id, incarnation, markers, max(logged, default=None))
        if incarnation is None:
            incarnation = self.metalog.create_incarnation(uuid.uuid4().hex)
            log.info("app %s starts fresh: incarnation %s", self.app_id, incarnation)
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
            metadata_lost=self.election.metadata_lost,
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
    def metadata_lost(self) -> str | None:
        """The one-line error when the app's Redis metadata was found lost, else None."""
        return self.election.lost

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
        token = self._http_token()  # a bad setting fails before anything listens
        self.server.start()
        _ = self.holder
        self.http = HttpEndpoints(
            self.settings.bind_host,
            self.settings.http_port_for("coordinator"),
            live=lambda: not self.stopping.is_set(),
            # readiness never waits for another pod: holding the lease and serving is
            # enough (a redis blip shorter than the lease does not unroute it; a leader
            # whose lease lapsed is not ready, so the Service routes to the new one)
            ready=lambda: self.election.answers() and not self.stopping.is_set(),
            status=self.status,
            token=token,
        ).start()
        log.info(
            "coordinator %s up on %s:%d (app %s); waiting for the lease",
            self.holder,
            *self.server.address,
            self.app_id,
        )
        threading.Thread(target=self.election.run, name="election", daemon=True).start()

    def _http_token(self) -> str | None:
        """The bearer token ``/api/status`` requires (``DSTREAM_HTTP_AUTH``), or None."""
        if not self.settings.http_auth:
            return None
        secret = self.settings.secret.get_secret_value()
        if not secret:
            msg = "DSTREAM_HTTP_AUTH=true needs the shared secret: set DSTREAM_SECRET"
            raise ConfigError(msg)
        return secret

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
        if not self.election.answers():
            if method == "status":
                return self.status()
            hint = ""
            if not self.holds_lease():  # a standby: Redis says who leads
                leader = self.metalog.leader()
                hint = leader.holder if leader and leader.holder != self.holder else ""
            # else a leader whose lease lapsed (cut off from Redis): who leads is unknown
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
    """Run a coordinator until SIGTERM/SIGINT, app failure, deposition or lost metadata.

    Returns the exit code: 0 asked to stop, :data:`APP_FAILED`, :data:`LOST_LEADERSHIP`,
    :data:`METADATA_LOST`.
    """
    if not settings.metrics:
        metrics.disable()
    c = Coordinator(settings, app_path, app_id, expect_workers)
    tune_gc()
    done = threading.Event()

    def _stop(_sig: int, _frm: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    c.start()
    while not done.wait(0.2):
        if c.failed is not None or c.deposed or c.metadata_lost is not None:
            break
    c.stop()
    if c.metadata_lost is not None:
        return METADATA_LOST
    if c.deposed:
        return LOST_LEADERSHIP
    return APP_FAILED if c.failed is not None else 0
