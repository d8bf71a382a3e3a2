"""The coordinator: membership, partition assignment, the batch clock, scheduling, commits.

The I/O shell around the pure :class:`engine.scheduler.Scheduler`. Each interval it seals
batch ``b`` on every worker (receivers cut their blocks and replicate them), writes the
batch's offset ranges to Redis, and only then schedules the batch's tasks. It grants each
(batch, output partition) its one commit right and marks batches complete in Redis.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from engine.errors import DStreamError, FencedError, NotLeaderError, RpcError
from engine.plan import Plan
from engine.scheduler import (
    SPECULATION_EVERY_S,
    BatchCompleted,
    CancelTask,
    FreeBlocks,
    Instruction,
    LaunchTask,
    ReadInput,
    Replicate,
    Scheduler,
    tune_gc,
)
from ops import metrics
from ops.config import Settings
from ops.http import HttpEndpoints
from ops.rpc import RpcClient
from ops.services import (
    build_context,
    redis_client,
    rpc_client,
    rpc_server,
    source_layout,
    topic_partitions,
)
from ops.worker import task_spec_to_wire
from state.checkpoint import RedisCheckpointStore
from state.metalog import Lease, MetaLog, OffsetRange, RedisMetaLog

log = logging.getLogger("dstream.coordinator")

#: Seal calls wait this long for a worker; a worker slower than that is treated as lost
#: for this batch (its partitions' records simply land in its next block).
SEAL_TIMEOUT_S = 10.0
#: The longest the first batch waits for ``--expect-workers`` (Spark's default
#: ``spark.scheduler.maxRegisteredResourcesWaitingTime``); it then starts with whoever joined.
REGISTRATION_WAIT_S = 30.0
#: After a restart or a takeover, the live workers rejoin within a heartbeat or two: the
#: first batch waits at most this long for ``--expect-workers`` (a scaled-down fleet has
#: fewer than the chart's replica count says).
REJOIN_WAIT_S = 2.0
#: Exit code of a coordinator whose app failed (fail_on_error): not restarted.
APP_FAILED = 3
#: Exit code of a coordinator that lost the lease to another: restarted, as a standby.
LOST_LEADERSHIP = 4
#: A standby tries to take a free lease this often.
LEASE_RETRY_S = 0.2
#: A leader stops acting this long before its lease could have expired in Redis (the
#: lease is measured from Redis' receipt of the renewal, after the local clock started).
LEASE_MARGIN_S = 0.5
#: Pseudo block id under which a batch's wall-clock time is logged with its ranges.
TIME_KEY = "@time"


class WorkerClient:
    """The coordinator's client of one worker: every call carries the epoch it leads in.

    A worker refuses calls from an epoch older than the one it registered under, so a
    deposed coordinator that wakes up can neither seal, launch nor assign anything.
    """

    def __init__(self, client: RpcClient, epoch: int) -> None:
        self._client = client
        self.epoch = epoch

    def call(self, method: str, params: Any = None, timeout: float = SEAL_TIMEOUT_S) -> Any:
        return self._client.call(method, {**(params or {}), "epoch": self.epoch}, timeout)

    def close(self) -> None:
        self._client.close()


@dataclass
class WorkerInfo:
    id: str
    slots: int
    client: WorkerClient
    last_seen: float
    received: int = 0
    store_bytes: int = 0
    blocks: int = 0
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    http_port: int = 0


@dataclass
class BatchInfo:
    batch: int
    time_ms: int
    sealed_at: float
    records: int = 0
    first_task: float | None = None
    done_at: float | None = None
    ranges: dict[str, OffsetRange] = field(default_factory=dict)


class Coordinator:
    """One coordinator process (``dstream coordinator``)."""

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
        self.max_keep = max(self.plan.keep.values(), default=0)
        #: the lease while leading (its epoch is the fencing token every write carries)
        self.lease: Lease | None = None
        self.epoch = 0
        #: leadership is certain until this monotonic time (renewed well inside the lease)
        self._leads_until = 0.0
        #: set when another coordinator took the lease: this one steps down (exits)
        self.deposed = False
        self.leading = threading.Event()
        #: actions refused while the lease was in doubt (the fencing counter's share here)
        self.refused = 0
        #: records per partition per batch (None: the workers' configured cap)
        self.rate_cap: int | None = None
        self.failed: str | None = None
        #: (time a loss was detected, batch that must complete for recovery to be over)
        self.recovering: tuple[float, int] | None = None
        self.under_replicated = 0
        self._next_reader = 0
        self.workers: dict[str, WorkerInfo] = {}
        self.assignment: dict[tuple[int, int], str] = {}
        self.batches: dict[int, BatchInfo] = {}
        self.history: list[BatchInfo] = []
        self.pending_ckpts: list[tuple[int, int, int]] = []
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.io = ThreadPoolExecutor(8, thread_name_prefix="coord-io")
        self.server = rpc_server(
            settings, self._handle, port=settings.coordinator_port, name="coordinator"
        )
        self._assignment_dirty = True
        self._holder = ""

    def _take_over(self, lease: Lease) -> None:
        """Become the leader under *lease*: read the metadata log and resume from it.

        The graph, the plan and the Kafka partition layout were built at start-up, so a
        standby taking over only reads what the last leader logged, then replays the
        batches it logged but did not finish.
        """
        self.epoch = lease.epoch
        logged = self.metalog.batches()
        done = self.metalog.done()
        self.first = self.metalog.first_batch(0)
        self.next_batch = max(
            [self.first, (done + 1) if done is not None else self.first, *(b + 1 for b in logged)]
        )
        settings = self.settings
        self.scheduler = Scheduler(
            self.plan,
            self.first,
            speculation=settings.speculation,
            multiplier=settings.speculation_multiplier,
            quantile=settings.speculation_quantile,
            # inputs since the last checkpoint stay (both copies): lost state is rebuilt
            # from them in parallel; a stalled checkpoint writer bounds the retention
            retain_inputs=2 * settings.checkpoint_every_batches + 2,
        )
        self.positions = self._initial_positions(logged)
        #: offset ranges of batches whose input may still be re-read (lineage)
        self.ranges: dict[int, dict[str, OffsetRange]] = {
            b: {k: v for k, v in r.items() if k != TIME_KEY} for b, r in logged.items()
        }
        self.times: dict[int, int] = {b: r[TIME_KEY][2] for b, r in logged.items() if TIME_KEY in r}
        self.done = done
        #: batches logged by an earlier coordinator but not complete: run again
        self.replay = sorted(b for b in logged if done is None or b > done)
        for (node, part), b in self.metalog.checkpoints().items():
            self.scheduler.set_checkpoint(node, part, b)
        self.lease = lease  # last: handlers see a leader only once its state is loaded

    # -- positions -------------------------------------------------------------------------
    def _initial_positions(
        self, logged: dict[int, dict[str, OffsetRange]]
    ) -> dict[tuple[int, int], int]:
        """Next offset to read per (source node, partition index).

        After the last logged batch, else the earliest (or latest) offset of the partition.
        """
        from confluent_kafka import Consumer, TopicPartition

        pos: dict[tuple[int, int], int] = {}
        for b in sorted(logged):
            for bid, (_t, _p, _lo, until, _n) in logged[b].items():
                if bid == TIME_KEY:
                    continue
                _, node, _, idx = bid.split("/")
                pos[(int(node), int(idx))] = until
        need = [
            (node, i, tp)
            for node, tps in self.layout.items()
            for i, tp in enumerate(tps)
            if (node, i) not in pos and tp[0]
        ]
        if need:
            c = Consumer(
                self.settings.kafka_client_config(
                    **{
                        "group.id": f"dstream-{self.app_id}-coordinator",
                        "enable.auto.commit": False,
                    }
                )
            )
            try:
                for src, index, (topic, part) in need:
                    lo, hi = c.get_watermark_offsets(TopicPartition(topic, part), timeout=30)
                    latest = self.ssc.nodes[src].args.get("start") == "latest"
                    pos[(src, index)] = hi if latest else lo
            finally:
                c.close()
        for src, tps in self.layout.items():
            for index, tp in enumerate(tps):
                if not tp[0]:
                    pos.setdefault((src, index), 0)
        return pos

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

    def holds_lease(self) -> bool:
        """Whether this coordinator took the lease and was not deposed (it may be in doubt)."""
        return self.lease is not None and not self.deposed

    def leads(self) -> bool:
        """Whether this coordinator may act as the leader right now.

        True only while its last lease renewal is recent enough that no other coordinator
        can have taken the lease (a process that was paused finds this out on waking,
        before it seals or grants anything).
        """
        return self.lease is not None and not self.deposed and time.monotonic() < self._leads_until

    def _may_act(self, what: str) -> bool:
        """:meth:`leads`, counting (metric, log) what a coordinator without it refused.

        A leader paused past its lease (or cut off from Redis) wakes up with its threads
        mid-loop: this check is what stops them before they act.
        """
        if self.leads():
            return True
        if self.lease is not None:
            self.refused += 1
            metrics.FENCED.labels(role="coordinator").inc()
            if self.refused == 1:
                log.warning("lease in doubt (epoch %d): refusing to %s", self.epoch, what)
        return False

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
            ready=lambda: (
                self.lease is not None and not self.deposed and not self.stopping.is_set()
            ),
            status=self.status,
        ).start()
        log.info(
            "coordinator %s up on %s:%d (app %s); waiting for the lease",
            self.holder,
            *self.server.address,
            self.app_id,
        )
        threading.Thread(target=self._election, name="election", daemon=True).start()

    def wait_leading(self, timeout: float) -> bool:
        """Block until this coordinator leads (tests, tools); False after *timeout*."""
        return self.leading.wait(timeout)

    def _election(self) -> None:
        """Take the lease when it is free, then renew it until stopped or deposed.

        A standby retries every :data:`LEASE_RETRY_S`; the leader renews every quarter of
        the lease and counts as leader until ``lease - LEASE_MARGIN_S`` after the start of
        its last successful renewal. A renewal that finds another holder deposes it: it
        stops acting at once and the process exits (as client-go's leader election
        callers do), to come back as a standby.
        """
        import redis

        ttl = self.settings.lease_seconds
        warned = False
        while not self.stopping.is_set():
            t0 = time.monotonic()
            try:
                if self.lease is None:
                    lease = self.metalog.acquire_lease(self.holder, ttl)
                    if lease is not None:
                        self._leads_until = t0 + ttl - LEASE_MARGIN_S
                        self._become_leader(lease)
                else:
                    if self.metalog.renew_lease(self.lease, ttl):
                        self._leads_until = t0 + ttl - LEASE_MARGIN_S
                    else:
                        self._step_down()
                        return
                if warned:
                    warned = False
                    log.warning("redis reachable again (leader lease)")
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if not warned:
                    warned = True
                    log.warning("redis unavailable for the leader lease: %s", e)
            except Exception:
                log.exception("leader election failed; retrying")
            self.stopping.wait(ttl / 4 if self.lease is not None else LEASE_RETRY_S)

    def _become_leader(self, lease: Lease) -> None:
        with self.lock:
            self._take_over(lease)
        metrics.LEADER.set(1)
        log.info(
            "coordinator %s leads (app %s, epoch %d, resuming at batch %d)",
            self.holder,
            self.app_id,
            self.epoch,
            self.next_batch,
        )
        self.leading.set()
        threading.Thread(target=self._clock, name="batch-clock", daemon=True).start()
        threading.Thread(target=self._monitor, name="monitor", daemon=True).start()
        if self.settings.speculation:
            threading.Thread(target=self._pump, name="speculation", daemon=True).start()

    def _step_down(self) -> None:
        """Another coordinator holds the lease: act no more, and stop the process."""
        self.deposed = True
        metrics.LEADER.set(0)
        leader = None
        with contextlib.suppress(Exception):
            leader = self.metalog.leader()
        log.error(
            "lost the leader lease (epoch %d) to %s; stepping down (%d actions refused "
            "since it lapsed)",
            self.epoch,
            leader.holder if leader else "another coordinator",
            self.refused,
        )
        self.stopping.set()

    def stop(self) -> None:
        """Stop scheduling and serving, and hand the lease over. The workers keep running.

        They re-register with the next leader (a standby, or this one restarted) with
        their blocks, so a coordinator upgrade or a node drain is a pause of a few batches,
        not an outage.
        """
        self.stopping.set()
        lease, self.lease = self.lease, None
        if lease is not None and not self.deposed:
            with contextlib.suppress(Exception):
                self.metalog.release_lease(lease)
        metrics.LEADER.set(0)
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.client.close()
        self.io.shutdown(wait=False, cancel_futures=True)
        self.server.stop()
        if getattr(self, "http", None) is not None:
            self.http.stop()

    # -- membership ------------------------------------------------------------------------
    def _handle(self, method: str, params: Any, peer: Any) -> Any:
        if not self.holds_lease():
            if method == "status":
                return self._standby_status()
            leader = self.metalog.leader()
            hint = leader.holder if leader and leader.holder != self.holder else ""
            raise NotLeaderError(self.holder, hint)
        if method == "register":
            return self._register(params)
        if method == "heartbeat":
            with self.lock:
                w = self.workers.get(params["worker"])
                if w is None:
                    return "unknown"
                w.last_seen = time.monotonic()
                w.received = params.get("received", 0)
                w.store_bytes = params.get("store_bytes", 0)
                w.blocks = params.get("blocks", 0)
                w.lag = {(t, p): n for t, p, n in params.get("lag", [])}
            return "ok"
        if method == "task_done":
            return self._task_done(params)
        if method == "task_failed":
            if str(params.get("error", "")).startswith("UserFunctionError"):
                # fail_on_error: the app stops with the error and the record's coordinates
                log.error("app failed: task %s: %s", params["task"], params["error"])
                self.failed = str(params["error"])
                self.stopping.set()
                return True
            with self.lock:
                self.scheduler.task_failed(
                    params["task"],
                    params["attempt"],
                    params["worker"],
                    params.get("missing"),
                    now=time.monotonic(),
                    gone_from=params.get("gone_from"),
                )
                metrics.TASKS_RETRIED.inc()
                if not params.get("missing"):
                    log.warning(
                        "task %s failed on %s: %s",
                        params["task"],
                        params["worker"],
                        params["error"],
                    )
                self._dispatch()
            return True
        if method == "request_commit":
            with self.lock:
                if not self._may_act("grant a commit"):
                    return "wait"
                if params.get("worker") not in self.workers:
                    return "denied"  # a worker declared lost holds no commit right
                return self.scheduler.request_commit(params["task"], params["attempt"])
        if method == "status":
            return self.status()
        if method == "checkpointed":
            return self._checkpointed(params)
        msg = f"unknown method {method}"
        raise DStreamError(msg)

    def _register(self, params: dict[str, Any]) -> dict[str, Any]:
        wid = params["worker"]
        with self.lock:
            old = self.workers.get(wid)
            if old is None:
                client = WorkerClient(rpc_client(self.settings, wid), self.epoch)
                self.workers[wid] = WorkerInfo(
                    wid,
                    params["slots"],
                    client,
                    time.monotonic(),
                    http_port=params.get("http_port", 0),
                )
                self.scheduler.add_worker(wid, params["slots"])
                for bid in params.get("blocks", []):
                    self.scheduler.block_added(bid, wid)
                log.info("worker %s joined (%d slots)", wid, params["slots"])
            # a known worker registers again after it lost touch (its receivers paused):
            # its partitions are sent again
            self._assignment_dirty = True
            metrics.LIVE_WORKERS.set(len(self.workers))
        return {
            "epoch": self.epoch,
            "first": self.first,
            "layout": {str(k): [list(tp) for tp in v] for k, v in self.layout.items()},
            "interval_ms": self.ssc.batch_interval_ms,
        }

    def _pump(self) -> None:
        """Tick the scheduler while tasks run.

        A straggler is then noticed when it crosses its threshold, not only when some other
        event happens to come.
        """
        while not self.stopping.wait(SPECULATION_EVERY_S):
            if not self._may_act("speculate"):
                continue
            with self.lock:
                if self.scheduler.batches and self.scheduler.running_count():
                    self._dispatch()

    def _monitor(self) -> None:
        """Declare workers lost after ``heartbeat_misses`` silent heartbeat intervals."""
        iv = self.settings.heartbeat_interval
        limit = iv * self.settings.heartbeat_misses
        while not self.stopping.wait(iv / 2):
            if not self._may_act("declare workers lost"):
                continue
            now = time.monotonic()
            with self.lock:
                lost = [w for w in self.workers.values() if now - w.last_seen > limit]
                for w in lost:
                    self._lose_worker(w.id)

    def _lose_worker(self, wid: str) -> None:
        w = self.workers.pop(wid, None)
        if w is None:
            return
        log.warning("worker %s lost: reassigning its partitions, rerunning its tasks", wid)
        w.client.close()
        self._apply(self.scheduler.remove_worker(wid))
        self._assignment_dirty = True
        metrics.LIVE_WORKERS.set(len(self.workers))
        metrics.RECOVERIES.inc()
        if self.recovering is None:
            self.recovering = (time.monotonic(), self.next_batch)
        self._dispatch()

    def _assign_partitions(self) -> list[tuple[WorkerInfo, dict[str, Any]]]:
        """Balanced round-robin of input partitions over live workers; kept where possible.

        Called with the lock held; returns the ``assign`` calls to make, which the caller
        sends after releasing the lock (and before the next seal, which keeps offsets exact).
        """
        workers = sorted(self.workers)
        calls: list[tuple[WorkerInfo, dict[str, Any]]] = []
        if not workers:
            return calls
        parts = sorted(self.positions)
        new: dict[tuple[int, int], str] = {}
        load = dict.fromkeys(workers, 0)
        quota = -(-len(parts) // len(workers))
        for key in parts:  # keep current owners up to their quota (no needless moves)
            owner = self.assignment.get(key)
            if owner in load and load[owner] < quota:
                new[key] = owner
                load[owner] += 1
        for key in parts:
            if key not in new:
                owner = min(workers, key=lambda w: (load[w], w))
                new[key] = owner
                load[owner] += 1
        self.assignment = new
        per: dict[str, list[Any]] = {w: [] for w in workers}
        for (node, idx), owner in new.items():
            topic, part = self.layout[node][idx]
            per[owner].append([node, idx, topic, part, self.positions[(node, idx)]])
        for i, w in enumerate(workers):
            peers = workers[i + 1 :] + workers[:i]
            params: dict[str, Any] = {"parts": per[w], "peers": peers}
            if self.settings.max_records_per_partition:
                params["max_records"] = self.settings.max_records_per_partition
            calls.append((self.workers[w], params))
        self._assignment_dirty = False
        return calls

    def _send_assignments(self, calls: list[tuple[WorkerInfo, dict[str, Any]]]) -> None:
        """Send ``assign`` to every worker at once, outside the lock; wait for all."""
        futures = [
            (w, self.io.submit(w.client.call, "assign", params, SEAL_TIMEOUT_S))
            for w, params in calls
        ]
        for w, f in futures:
            try:
                f.result()
            except Exception as e:
                log.warning("assigning partitions to %s failed: %s", w.id, e)

    # -- the batch clock -------------------------------------------------------------------
    def _clock(self) -> None:
        iv = self.settings.batch_interval
        # a new app waits for its fleet; one that ran before resumes with the workers that
        # rejoin (they do within a heartbeat or two), not with the number it was told
        fresh = self.done is None and not self.replay
        if not self._await_workers(REGISTRATION_WAIT_S if fresh else REJOIN_WAIT_S):
            return
        with self.lock:
            calls = self._assign_partitions()
        self._send_assignments(calls)
        with self.lock:
            self._replay_logged()
        # the first batch is cut at once: after a takeover, the records since the last
        # leader's last batch are already waiting
        start = time.time()
        k = -1
        while not self.stopping.is_set():
            k += 1
            wake = start + k * iv
            delay = wake - time.time()
            if delay > 0 and self.stopping.wait(delay):
                return
            try:
                self._seal_batch(int(wake * 1000))
            except Exception:
                log.exception("sealing a batch failed")

    def _await_workers(self, wait_s: float) -> bool:
        """Wait for ``expect_workers`` workers, or *wait_s* and at least one; False if stopped.

        Like Spark's ``minRegisteredResourcesRatio`` with its 30 s
        ``maxRegisteredResourcesWaitingTime``: starting with every expected worker avoids
        moving partitions right after the first batch, but a missing pod never holds the
        app back for long.
        """
        start = time.monotonic()
        while not self.stopping.wait(0.05):
            with self.lock:
                n = len(self.workers)
            if n >= self.expect_workers:
                return True
            if n and time.monotonic() - start >= wait_s:
                log.warning(
                    "starting with %d of %d expected workers after %.0f s",
                    n,
                    self.expect_workers,
                    wait_s,
                )
                return True
        return False

    def _replay_logged(self) -> None:
        """Batches an earlier coordinator logged but did not finish: run them again.

        Their inputs are re-read from Kafka by the logged offset ranges, their state rebuilt
        from the last checkpoints; sinks skip what was already committed.
        """
        for b in self.replay:
            if b < self.next_batch:
                now = time.monotonic()
                info = BatchInfo(b, self.times.get(b, 0), now, ranges=self.ranges.get(b, {}))
                info.records = sum(r[4] for r in info.ranges.values())
                self.batches[b] = info
                self.scheduler.add_batch(b, now)
        if self.replay:
            log.info("replaying batches %d..%d of an earlier run", self.replay[0], self.replay[-1])
        self._dispatch()

    def _seal_batch(self, time_ms: int) -> None:
        if not self._may_act("seal a batch"):
            return
        with self.lock:
            b = self.next_batch
            self.next_batch += 1
            workers = list(self.workers.values())
        seal = {"batch": b, "max_records": self.rate_cap}
        futures = {
            w.id: self.io.submit(w.client.call, "seal", seal, SEAL_TIMEOUT_S) for w in workers
        }
        reports: list[Any] = []
        for wid, f in futures.items():
            try:
                reports.extend(f.result())
            except Exception as e:
                log.warning("seal of batch %d on %s failed: %s", b, wid, e)
        info = BatchInfo(b, time_ms, time.monotonic())
        for bid, topic, part, lo, until, count, _size, _holders in reports:
            info.ranges[bid] = (topic, part, lo, until, count)
            info.records += count
        with self.lock:
            # a partition no worker reported (its owner died or was moved) gets an empty
            # range: its records go to the next block of its next owner
            for (node, idx), pos in self.positions.items():
                bid = f"in/{node}/{b}/{idx}"
                if bid not in info.ranges:
                    topic, part = self.layout[node][idx]
                    info.ranges[bid] = (topic, part, pos, pos, 0)
            self.ranges[b] = info.ranges
            self.times[b] = time_ms
        # the offset ranges are durable before anything is scheduled
        self._durable(
            "logging a batch",
            self.metalog.log_batch,
            self.epoch,
            b,
            {**info.ranges, TIME_KEY: ("", 0, time_ms, time_ms, 0)},
        )
        with self.lock:
            for bid, _t, _p, _lo, until, _c, size, holders in reports:
                _, node, _, idx = bid.split("/")
                self.positions[(int(node), int(idx))] = until
                if len(holders) < min(2, len(self.workers)):
                    self.under_replicated += 1
                for h in holders:
                    self.scheduler.block_added(bid, h, size)
            self.batches[b] = info
            metrics.BATCH_RECORDS.observe(info.records)
            self.scheduler.add_batch(b, info.sealed_at)
            metrics.BATCHES_PENDING.set(len(self.scheduler.batches))
            calls = self._assign_partitions() if self._assignment_dirty else []
            self._dispatch()
        if calls:
            self._send_assignments(calls)

    # -- scheduling ------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Turn scheduler instructions into RPCs (called with the lock held)."""
        now = time.monotonic()
        self._apply(self.scheduler.tick(now))

    def _apply(self, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, LaunchTask):
                self._launch(ins)
            elif isinstance(ins, FreeBlocks):
                w = self.workers.get(ins.worker)
                if w is not None:
                    self.io.submit(_quiet_call, w.client, "free", {"blocks": list(ins.block_ids)})
            elif isinstance(ins, CancelTask):
                w = self.workers.get(ins.worker)
                if w is not None:
                    self.io.submit(
                        _quiet_call,
                        w.client,
                        "cancel",
                        {"task": ins.task_id, "attempt": ins.attempt},
                    )
            elif isinstance(ins, BatchCompleted):
                self._batch_completed(ins.batch)
            elif isinstance(ins, ReadInput):
                self._read_input(ins.block_id)
            elif isinstance(ins, Replicate):
                src = self.workers.get(ins.source)
                if src is not None:
                    self.io.submit(self._send_replicate, src, ins)

    def _send_replicate(self, src: WorkerInfo, ins: Replicate) -> None:
        try:
            size = src.client.call(
                "replicate_to", {"block": ins.block_id, "target": ins.target}, timeout=60
            )
        except RpcError as e:
            log.warning("re-replicating %s to %s failed: %s", ins.block_id, ins.target, e)
            return
        with self.lock:
            self.scheduler.block_added(ins.block_id, ins.target, size)

    def _durable(self, what: str, fn: Any, *args: Any) -> Any:
        """Run a Redis write until it succeeds; fencing errors are not retried.

        The fleet waits (degraded, said once in the log and in a metric) rather than go on
        without the metadata it must write first. A fenced write means another coordinator
        leads: this one steps down at once, without waiting for its next lease renewal.
        """
        import redis

        delay = 0.1
        degraded = False
        while True:
            try:
                result = fn(*args)
            except FencedError:
                if not self.deposed:
                    self._step_down()
                raise
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if not degraded:
                    degraded = True
                    metrics.DEGRADED.labels(dependency="redis").set(1)
                    log.warning("redis unavailable (%s: %s): waiting and retrying", what, e)
                if self.stopping.wait(delay):
                    raise
                delay = min(2.0, delay * 2)
                continue
            if degraded:
                metrics.DEGRADED.labels(dependency="redis").set(0)
                log.warning("redis available again (%s)", what)
            return result

    def _read_input(self, bid: str) -> None:
        """Have a live worker rebuild input block *bid* from its logged offset range."""
        b = int(bid.split("/")[2])
        rng = self.ranges.get(b, {}).get(bid)
        workers = sorted(self.workers)
        if rng is None or not workers:
            log.error(
                "cannot rebuild %s: %s",
                bid,
                "no offset range logged" if rng is None else "no live worker",
            )
            return
        w = self.workers[workers[self._next_reader % len(workers)]]
        self._next_reader += 1
        topic, part, lo, until, _n = rng
        params = {"block": bid, "topic": topic, "partition": part, "from": lo, "until": until}
        self.io.submit(self._send_read_input, w, bid, params)

    def _send_read_input(self, w: WorkerInfo, bid: str, params: Any) -> None:
        try:
            size = w.client.call("read_input", params, timeout=120)
        except RpcError as e:
            log.warning("re-reading %s on %s failed: %s", bid, w.id, e)
            size = None
        with self.lock:
            if size is None:
                self.scheduler.read_failed(bid)
            else:
                self.scheduler.block_added(bid, w.id, size)
            self._dispatch()

    def _launch(self, ins: LaunchTask) -> None:
        spec = ins.spec
        info = self.batches.get(spec.batch)
        if info is not None and info.first_task is None:
            info.first_task = time.monotonic()
            metrics.SCHEDULING_DELAY.observe(info.first_task - info.sealed_at)
        if ins.speculative:
            metrics.SPECULATIVE_LAUNCHED.inc()
        locations = self.scheduler.locations_of(spec)
        w = self.workers.get(ins.worker)
        if w is None:
            return
        # input blocks are checked against their logged offset ranges (stale copies exist)
        ranges = {}
        for bid in locations:
            if bid.startswith("in/"):
                rng = self.ranges.get(int(bid.split("/")[2]), {}).get(bid)
                if rng is not None:
                    ranges[bid] = [rng[2], rng[3]]
        params = {
            "spec": task_spec_to_wire(spec),
            "attempt": ins.attempt,
            "locations": locations,
            "ranges": ranges,
            "time_ms": info.time_ms if info else self.times.get(spec.batch, 0),
        }
        self.io.submit(self._send_launch, w, spec.id, ins.attempt, params)

    def _send_launch(self, w: WorkerInfo, task_id: str, attempt: int, params: Any) -> None:
        try:
            w.client.call("launch", params, timeout=SEAL_TIMEOUT_S)
        except RpcError as e:
            log.info("launch of %s on %s failed: %s", task_id, w.id, e)
            with self.lock:
                self.scheduler.task_failed(task_id, attempt, w.id, now=time.monotonic())
                self._dispatch()

    def _task_done(self, p: dict[str, Any]) -> bool:
        with self.lock:
            before = self.scheduler.stats.speculative_won
            out = self.scheduler.task_finished(
                p["task"], p["attempt"], p["worker"], time.monotonic(), p.get("size", 0)
            )
            if self.scheduler.stats.speculative_won > before:
                metrics.SPECULATIVE_WON.inc()
            self._apply(out)
            self._dispatch()
        return True

    def _batch_completed(self, b: int) -> None:
        info = self.batches.pop(b, None)
        now = time.monotonic()
        if info is not None:
            info.done_at = now
            start = info.first_task or now
            metrics.PROCESSING_TIME.observe(now - start)
            metrics.TOTAL_DELAY.observe(now - info.sealed_at)
            self.history.append(info)
            del self.history[:-200]
            if self.settings.adaptive_rate:
                self._adapt_rate(info, now - start)
        metrics.BATCHES_COMPLETED.inc()
        metrics.BATCHES_PENDING.set(len(self.scheduler.batches))
        done = self.scheduler.done_upto()
        if self.recovering is not None and done >= self.recovering[1]:
            metrics.RECOVERY_TIME.observe(time.monotonic() - self.recovering[0])
            log.info("recovered in %.2f s", time.monotonic() - self.recovering[0])
            self.recovering = None
        if self.done is None or done > self.done:
            self.done = done
            ready = [c for c in self.pending_ckpts if c[2] <= done]
            self.pending_ckpts = [c for c in self.pending_ckpts if c[2] > done]
            for node, part, cb in ready:
                self.scheduler.set_checkpoint(node, part, cb)
            oldest = min(self.scheduler.checkpoints.values(), default=done)
            # ranges are kept a while past what lineage needs (audits, tests: 1000 batches)
            keep_from = min(oldest, done) - self.max_keep - 1000
            for x in [x for x in self.ranges if x < keep_from]:
                del self.ranges[x]
                self.times.pop(x, None)
            self.io.submit(self._mark_done, done, ready, keep_from)

    def _lag(self, owner: str, tp: tuple[str, int]) -> int | None:
        w = self.workers.get(owner)
        return None if w is None else w.lag.get(tp)

    def _adapt_rate(self, info: BatchInfo, processing: float) -> None:
        """Backpressure: a per-partition cap so a batch processes in ~80% of the interval.

        Sized from the rate the last batch was processed at, smoothed over batches.
        """
        iv = self.settings.batch_interval
        parts = max(1, len(self.positions))
        if info.records < parts or processing <= 0:
            return
        rate = info.records / processing  # records/s the fleet just sustained
        target = max(10, int(rate * iv * 0.8 / parts))
        cap = self.settings.max_records_per_partition
        if cap:
            target = min(target, cap)
        old = self.rate_cap
        self.rate_cap = target if old is None else max(10, (old + target) // 2)

    def _mark_done(self, b: int, ckpts: list[tuple[int, int, int]], keep_from: int) -> None:
        """Persist progress: batches done, checkpoints in force, lineage still needed."""
        try:
            for node, part, cb in ckpts:
                self._durable(
                    "checkpoint pointer", self.metalog.set_checkpoint, self.epoch, node, part, cb
                )
                self.checkpoint_store.delete_before(node, part, cb)
            self._durable("batch done", self.metalog.mark_done, self.epoch, b)
            self.metalog.forget_before(keep_from)
        except Exception as e:
            log.warning("marking batch %d done failed: %s", b, e)

    def _checkpointed(self, p: dict[str, Any]) -> bool:
        """A worker wrote a checkpoint; it takes effect once its batch is done."""
        with self.lock:
            self.pending_ckpts.append((p["node"], p["part"], p["batch"]))
        return True

    # -- status ----------------------------------------------------------------------------
    def _standby_status(self) -> dict[str, Any]:
        """What a coordinator that does not lead can tell: who does."""
        leader = None
        with contextlib.suppress(Exception):
            leader = self.metalog.leader()
        return {
            "app": self.app_id,
            "role": "deposed" if self.deposed else "standby",
            "coordinator": self.holder,
            "leader": leader.holder if leader else None,
            "leader_epoch": leader.epoch if leader else None,
            "epoch": self.epoch,
        }

    def status(self) -> dict[str, Any]:
        """The leader's view of batches, workers and receivers (a standby's: the leader)."""
        if not self.holds_lease():
            return self._standby_status()
        with self.lock:
            batches = [
                {
                    "batch": i.batch,
                    "time_ms": i.time_ms,
                    "records": i.records,
                    "scheduling_delay": (i.first_task - i.sealed_at) if i.first_task else None,
                    "processing_time": (i.done_at - i.first_task)
                    if i.done_at and i.first_task
                    else None,
                    "total_delay": (i.done_at - i.sealed_at) if i.done_at else None,
                }
                for i in self.history[-50:]
            ]
            return {
                "app": self.app_id,
                "role": "leader",
                "coordinator": self.holder,
                "epoch": self.epoch,
                "next_batch": self.next_batch,
                "pending": sorted(self.scheduler.batches),
                "batches": batches,
                "workers": [
                    {
                        "id": w.id,
                        "slots": w.slots,
                        "store_bytes": w.store_bytes,
                        "blocks": w.blocks,
                        "received": w.received,
                        "http_port": w.http_port,
                        "last_seen_s": round(time.monotonic() - w.last_seen, 3),
                    }
                    for w in self.workers.values()
                ],
                "under_replicated_blocks": self.under_replicated,
                "oldest_pending": self.scheduler.describe_batch(min(self.scheduler.batches))
                if self.scheduler.batches
                else [],
                "interval_ms": self.ssc.batch_interval_ms,
                "first_time_ms": self.times.get(self.first),
                "recovering": self.recovering is not None,
                "rate_cap": self.rate_cap,
                "receivers": [
                    {
                        "node": n,
                        "index": i,
                        "topic": self.layout[n][i][0],
                        "partition": self.layout[n][i][1],
                        "owner": o,
                        "position": self.positions.get((n, i)),
                        "lag": self._lag(o, self.layout[n][i]),
                    }
                    for (n, i), o in sorted(self.assignment.items())
                ],
                "stats": vars(self.scheduler.stats),
                "http_port": self.http.port if getattr(self, "http", None) else None,
            }


def _quiet_call(client: WorkerClient, method: str, params: Any) -> None:
    try:
        client.call(method, params, timeout=SEAL_TIMEOUT_S)
    except RpcError as e:
        log.debug("%s failed: %s", method, e)


def run_coordinator(settings: Settings, app_path: str, app_id: str, expect_workers: int) -> int:
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
