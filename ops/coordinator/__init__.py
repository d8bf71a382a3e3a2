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
* :class:`.queries.StateQueries` - named streams' state for ``dstream query`` and
  ``/api/state/{stream}``;
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

from engine.bounds import Bound
from engine.errors import ConfigError, DStreamError, MetadataLostError, NotLeaderError
from engine.plan import Plan
from engine.scheduler import tune_gc
from ops import metrics, startup
from ops import protocol as wire
from ops.config import Settings
from ops.coordinator.bounded import decode_stops, encode_stops, kafka_offsets, source_bounds
from ops.coordinator.durable import DurableWriter
from ops.coordinator.leader import Leader, status_of
from ops.coordinator.leadership import LeaderElection
from ops.coordinator.membership import WorkerClient
from ops.coordinator.status import standby_status
from ops.coordinator.tables import TableLoader, load_targets, table_partitions
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
#: How long a finished bounded run waits for each worker to take the ``finish`` call.
FINISH_TIMEOUT_S = 5.0

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


class _ForgetLoads:
    """A completion listener: once a batch completed, forget the table load offsets."""

    def __init__(self, metalog: MetaLog) -> None:
        self.metalog = metalog
        self.done = False

    def on_batch_completed(self, _info: Any, _processing_s: float) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.metalog.clear_load_offsets()
        except Exception as e:  # best effort: a later leader ignores them (not fresh)
            log.debug("forgetting the table load offsets failed: %s", e)


class Coordinator:
    """One coordinator process (``dstream coordinator``): leader or standby."""

    def __init__(
        self,
        settings: Settings,
        app_path: str,
        app_id: str,
        expect_workers: int = 1,
        metalog: MetaLog | None = None,
        until: Bound | None = None,
    ) -> None:
        self.settings = settings
        self.app_id = app_id
        #: ``--until``: bounds every Kafka source of the app (a bounded run)
        self.until = until
        #: a bounded run that finished: (records, batches, seconds); None while running
        self.finished: tuple[int, int, float] | None = None
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
        self._load_tables(fresh=resume.done is None and not resume.ranges)
        self._bound_run()

    def _fail(self, error: str) -> None:
        """fail_on_error: the app stops with the error and the record's coordinates."""
        self.failed = error
        self.stopping.set()

    def _first_offsets(self, need: list[tuple[int, int, str, int]]) -> dict[tuple[int, int], int]:
        """Where Kafka partitions the log does not cover start: earliest, latest or a time."""
        from confluent_kafka import Consumer

        c = Consumer(
            self.settings.kafka_client_config(
                **{"group.id": f"dstream-{self.app_id}-coordinator", "enable.auto.commit": False}
            )
        )
        try:
            return kafka_offsets(
                c,
                [
                    (
                        (node, index),
                        topic,
                        part,
                        self.ssc.nodes[node].args.get("start_bound")
                        or Bound(self.ssc.nodes[node].args.get("start", "earliest")),
                    )
                    for node, index, topic, part in need
                ],
            )
        finally:
            c.close()

    # -- tables (#15) ---------------------------------------------------------------------
    def _load_tables(self, *, fresh: bool) -> None:
        """A fresh app's table topics: fix their end offsets; the first batch waits for them.

        The ends are resolved from Kafka now and proposed to the metadata log, which keeps
        the first leader's (a leader that takes over before the first batch loads up to
        the same offsets). An app that logged a batch needs nothing: its tables come back
        from their checkpoints and the logged ranges.
        """
        parts = table_partitions(self.ssc.nodes, self.layout)
        if not parts:
            return
        if not fresh:
            try:
                self.metalog.clear_load_offsets()  # left by a leader that died after batch 0
            except Exception as e:
                log.debug("forgetting the table load offsets failed: %s", e)
            return
        ends = self._offsets([(k, t, p, Bound("end")) for k, (t, p) in parts.items()])
        stored = decode_stops(self.metalog.load_offsets(encode_stops(ends)))
        leader = self.leader
        targets = load_targets(
            {k: stored.get(k, off) for k, off in ends.items()}, leader.receivers.positions
        )
        if not targets:
            return
        leader.receivers.loads = targets
        leader.clock.before_first_cut = TableLoader(
            targets=targets,
            layout=self.layout,
            receivers=leader.receivers,
            membership=leader.membership,
            send_assignments=leader.clock.send_assignments,
            io=self.io,
            lock=self.lock,
            stopping=self.stopping,
            fail_app=self._fail,
        ).wait
        leader.completion.listeners.append(_ForgetLoads(self.metalog))

    def _offsets(self, asked: list[tuple[Any, str, int, Bound]]) -> dict[Any, int]:
        """The offsets of *asked* ``(key, topic, partition, bound)``, from Kafka (committed)."""
        from confluent_kafka import Consumer

        c = Consumer(
            self.settings.kafka_client_config(
                **{
                    "group.id": f"dstream-{self.app_id}-coordinator",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                }
            )
        )
        try:
            return kafka_offsets(c, asked)
        finally:
            c.close()

    # -- bounded runs (#15) ----------------------------------------------------------------
    def _bound_run(self) -> None:
        """A bounded run: fix the stop offsets (once per run, kept in the metadata log).

        The offsets are resolved from Kafka now and proposed to the metadata log, which
        keeps the first run's: a restarted or new leader stops at the same offsets.
        """
        bounds = source_bounds(self.ssc.nodes, self.layout, self.until)
        if not bounds:
            return
        proposed = self._offsets([(k, t, p, b) for k, (t, p, b) in bounds.items()])
        stored = decode_stops(self.metalog.stop_offsets(encode_stops(proposed)))
        stops = {k: stored.get(k, off) for k, off in proposed.items()}
        self.leader.receivers.stops = stops
        self.leader.clock.stops = stops
        self.leader.clock.on_finished = self._finish_run
        shown = sorted({b.describe() for _t, _p, b in bounds.values()})
        pos = self.leader.receivers.positions
        log.info(
            "bounded run (until %s): %d offsets to read in %d partitions",
            ", ".join(shown),
            sum(max(0, off - pos.get(k, 0)) for k, off in stops.items()),
            len(stops),
        )

    def _finish_run(self, records: int, batches: int, seconds: float) -> None:
        """The bounded run's last batch completed: tell the workers, forget the stops.

        The workers exit 0, as the executors of a finished Spark job do; the next run of
        the app resumes after this one and computes its own end.
        """
        with self.lock:
            workers = list(self.leader.membership.workers.values())
        calls = [
            (w, self.io.submit(w.client.send, wire.Finish(records, batches), FINISH_TIMEOUT_S))
            for w in workers
        ]
        for w, f in calls:
            try:
                f.result()
            except Exception as e:
                log.warning("telling %s the run finished failed: %s", w.id, e)
        try:
            self.metalog.clear_stop_offsets()
        except Exception as e:
            log.warning("forgetting the stop offsets failed: %s", e)
        self.finished = (records, batches, seconds)

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
            query=self.query_http,
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

    def query_http(
        self, stream: str, keys: list[str], prefix: str, limit: int | None
    ) -> tuple[int, dict[str, Any]]:
        """``GET /api/state/{stream}``: the HTTP code and JSON body of a query (the leader's)."""
        from engine.query import QueryError
        from ops.protocol import Query

        if not self.election.answers():
            leader = self.metalog.leader() if not self.holds_lease() else None
            where = leader.holder if leader and leader.holder != self.holder else "unknown"
            return 503, {"error": f"this coordinator does not lead; the leader is {where}"}
        try:
            return 200, self.leader.queries.answer(Query(self.app_id, stream, keys, prefix, limit))
        except QueryError as e:
            return e.status, {"error": str(e)}

    def status(self) -> dict[str, Any]:
        """The leader's view of batches, workers and receivers (a standby's: the leader)."""
        if not self.holds_lease():
            return standby_status(self.app_id, self.holder, self.election)
        return status_of(self.leader)


def run_coordinator(
    settings: Settings,
    app_path: str,
    app_id: str,
    expect_workers: int,
    until: Bound | None = None,
) -> int:
    """Run a coordinator until SIGTERM/SIGINT, app failure, deposition or lost metadata.

    A bounded run (*until*, or a source's ``stop``) also stops when it finished, after its
    last batch committed: it prints one summary line (records, batches, seconds) and
    returns 0.

    Returns the exit code: 0 asked to stop (or finished), :data:`APP_FAILED`,
    :data:`LOST_LEADERSHIP`, :data:`METADATA_LOST`.
    """
    if not settings.metrics:
        metrics.disable()
    c = Coordinator(settings, app_path, app_id, expect_workers, until=until)
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
        if c.finished is not None:
            break
    if c.finished is not None:
        records, batches, seconds = c.finished
        print(
            f"bounded run finished: {records} records, {batches} batches, "
            f"{seconds:.2f} seconds ({records / max(seconds, 1e-9):.0f} records/s)",
            flush=True,
        )
    c.stop()
    if c.metadata_lost is not None:
        return METADATA_LOST
    if c.deposed:
        return LOST_LEADERSHIP
    return APP_FAILED if c.failed is not None else 0
