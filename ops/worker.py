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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.codec import CodecError, encode_input_block, input_block_range, pack, unpack
from engine.errors import DStreamError, FencedError, RpcError
from engine.executor import BlockMissing, Executor, StateBlock
from engine.plan import Plan, TaskSpec, block_node
from engine.scheduler import CHECKPOINT
from ingest.receiver import Assignment, Receivers
from ops import faults, metrics
from ops.config import Settings
from ops.http import HttpEndpoints
from ops.leader_client import LeaderClient
from ops.rpc import RemoteError, RpcClient
from ops.services import build_context, redis_client, rpc_client, rpc_server
from ops.sinks import FleetSinks
from state.blockstore import BlockStore
from state.checkpoint import RedisCheckpointStore

log = logging.getLogger("dstream.worker")

#: How long a fetch from a peer may take before trying the next holder (a 64 MiB block
#: at loopback speeds takes well under a second).
FETCH_TIMEOUT_S = 20.0
#: Back-off between commit-right polls while earlier batches of the partition commit.
COMMIT_WAIT_S = 0.005


#: After SIGTERM, running tasks get this long to finish before the process exits anyway
#: (well inside Kubernetes' default 30 s grace period; the coordinator reruns them).
STOP_DEADLINE_S = 15.0
#: A registration call waits this long (a paused coordinator accepts but never answers).
REGISTER_TIMEOUT_S = 5.0
#: Registration retries back off up to this: a standby about to lead is joined soon after.
REGISTER_BACKOFF_MAX_S = 0.25
#: Calls only a coordinator makes; each carries its epoch, and an older one is refused.
COORDINATOR_CALLS = frozenset(
    {"launch", "seal", "assign", "free", "cancel", "read_input", "replicate_to"}
)
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


def task_spec_from_wire(w: Any) -> TaskSpec:
    tid, kind, node, side, batch, part, inputs, stage = w
    return TaskSpec(
        tid, kind, node, side, batch, part, tuple((str(b), int(k)) for b, k in inputs), stage
    )


def task_spec_to_wire(s: TaskSpec) -> list[Any]:
    # msgpack packs the tuples as arrays: no per-input copy (a reduce has one per map task)
    return [s.id, s.kind, s.node, s.side, s.batch, s.part, s.inputs, s.stage]


class Worker:
    """One worker process (``dstream worker``)."""

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
        self.pool = ThreadPoolExecutor(settings.task_slots, thread_name_prefix="task")
        self.peers: dict[str, RpcClient] = {}
        self.peer_ids: list[str] = []
        self.plan: Plan | None = None
        self.executor: Executor | None = None
        self.epoch = 0
        self.queue_parts: dict[int, int] = {}  # queue source node -> assigned
        self.first = 0
        self.id = ""
        self.stopping = threading.Event()
        self.sinks = FleetSinks(settings, app_id, epoch_fn=lambda: self.epoch)
        self._lock = threading.Lock()
        self.cancelled: set[tuple[str, int]] = set()
        self.checkpoints = RedisCheckpointStore(redis_client(settings), app_id)
        #: one thread: checkpoints are written in order, off the task path
        self.ckpt_pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.stateful: set[int] = set()
        self.reader: Any = None
        #: bumped when the coordinator no longer knows this worker (it was declared lost):
        #: tasks launched under an older incarnation must not commit
        self.incarnation = 0
        self.last_ok = time.monotonic()
        self.lease = settings.heartbeat_interval * settings.heartbeat_misses
        self.slow = faults.slow_factor()

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
        log.info(
            "worker %s up (app %s, %d slots, rpc :%d, http :%d); joining coordinator %s",
            self.id,
            self.app_id,
            self.settings.task_slots,
            port,
            self.http.port,
            self.settings.coordinator,
        )
        self._membership = threading.Thread(target=self._membership_loop, name="membership")
        self._membership.daemon = True
        self._membership.start()

    def _membership_loop(self) -> None:
        if self._register():
            self._heartbeat_loop()

    def _register(self) -> bool:
        """Register with the coordinator, retrying until it answers or the worker stops.

        An unreachable coordinator is logged at warning level once, then every
        :data:`UNREACHABLE_LOG_EVERY_S` while it stays unreachable. Returns False when the
        worker was stopped first.
        """
        delay = 0.05
        warned_at: float | None = None
        while not self.stopping.is_set():
            try:
                reply = self.coordinator.call(
                    "register",
                    {
                        "worker": self.id,
                        "slots": self.settings.task_slots,
                        "blocks": self.store.ids(),
                        "http_port": self.http.port,
                    },
                    timeout=REGISTER_TIMEOUT_S,
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
        if self.epoch and reply["epoch"] != self.epoch:
            log.info("joined a new coordinator (epoch %d -> %d)", self.epoch, reply["epoch"])
        self.epoch = reply["epoch"]
        self.first = reply["first"]
        self.last_ok = time.monotonic()
        layout = {int(k): len(v) for k, v in reply["layout"].items()}
        if self.plan is None:
            self.plan = Plan(self.ssc.nodes, layout)
            self.stateful = {n.id for n in self.plan.stateful_nodes()}
            self.executor = Executor(
                self.plan, self.first, self.ssc.batch_interval_ms, self.settings.fail_on_error
            )
        return True

    def _heartbeat_loop(self) -> None:
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
                reply = self.coordinator.call(
                    "heartbeat",
                    {
                        "worker": self.id,
                        "store_bytes": self.store.nbytes,
                        "blocks": len(self.store),
                        "received": self.receivers.received,
                        "lag": [[t, p, n] for (t, p), n in self.receivers.lag.items()],
                    },
                    timeout=iv * 4,
                )
                metrics.BLOCK_STORE_BYTES.set(self.store.nbytes)
                for (t, p), n in self.receivers.lag.items():
                    metrics.RECEIVER_LAG.labels(topic=t, partition=str(p)).set(n)
                metrics.BLOCK_STORE_BLOCKS.set(len(self.store))
                if reply == "unknown":
                    # declared lost (paused, partitioned) or a new coordinator: rejoin
                    self.incarnation += 1
                    self.receivers.assign([])
                    log.warning(
                        "worker %s is unknown to the coordinator (declared lost, or a new "
                        "coordinator); rejoining",
                        self.id,
                    )
                    if not self._register():
                        return
                    orphaned = False
                elif orphaned:
                    # the same coordinator is back: register again so that it resends
                    # this worker's partitions (its receivers were paused)
                    if not self._register():
                        return
                    orphaned = False
                else:
                    self.last_ok = time.monotonic()
            except RpcError as e:
                log.debug("heartbeat failed: %s", e)
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
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.ckpt_pool.shutdown(wait=False)
        clean = _join_all(
            [*self.pool._threads, *self.ckpt_pool._threads],  # type: ignore[attr-defined]
            end,
        )
        self.server.stop()
        self.coordinator.close()
        for c in list(self.peers.values()):
            c.close()
        self.sinks.close()
        return clean

    # -- rpc -------------------------------------------------------------------------------
    def _handle(self, method: str, params: Any, peer: Any) -> Any:
        if method in COORDINATOR_CALLS:
            epoch = params.get("epoch")
            if epoch is not None and epoch < self.epoch:
                # a deposed coordinator (paused past its lease, then woken): refuse it
                metrics.FENCED.labels(role="worker").inc()
                msg = f"{method} from epoch {epoch} refused: the leader's epoch is {self.epoch}"
                raise FencedError(msg)
        if method == "fetch":
            return self.store.get_bytes(params["block"], params.get("bucket", -1))
        if method == "launch":
            spec = task_spec_from_wire(params["spec"])
            self.pool.submit(
                self._run_task,
                spec,
                params["attempt"],
                params["locations"],
                params.get("time_ms", 0),
                self.incarnation,
                params.get("ranges") or {},
            )
            return True
        if method == "replicate":
            bid = params["block"]
            self.store.put(bid, params["data"], replace=bid.startswith("in/"))
            return True
        if method == "seal":
            if params.get("max_records") is not None:
                self.receivers.max_records = params["max_records"]
            return self._seal(params["batch"])
        if method == "read_input":
            return self._read_input(params)
        if method == "replicate_to":
            data = self.store.get_bytes(params["block"])
            self._peer(params["target"]).call(
                "replicate", {"block": params["block"], "data": data}, timeout=FETCH_TIMEOUT_S
            )
            return len(data)
        if method == "assign":
            return self._assign(params)
        if method == "free":
            self.store.free(params["blocks"])
            return len(self.store)
        if method == "cancel":
            self.cancelled.add((params["task"], params["attempt"]))
            return True
        if method == "ping":
            return self.id
        msg = f"unknown method {method}"
        raise DStreamError(msg)

    def _peer(self, addr: str) -> RpcClient:
        with self._lock:
            c = self.peers.get(addr)
            if c is None:
                c = rpc_client(self.settings, addr)
                self.peers[addr] = c
            return c

    def _assign(self, params: dict[str, Any]) -> bool:
        parts = []
        self.queue_parts = {}
        for node, index, topic, partition, start in params["parts"]:
            n = self.ssc.nodes[node]
            if n.args["source"] == "queue":
                self.queue_parts[node] = index
                continue
            parts.append(
                Assignment(node, index, topic, partition, start, bool(n.args.get("with_metadata")))
            )
        self.receivers.assign(parts)
        self.peer_ids = [p for p in params.get("peers", []) if p != self.id]
        if "max_records" in params:
            self.receivers.max_records = params["max_records"]
        return True

    def _seal(self, b: int) -> list[Any]:
        """Seal batch *b*'s blocks, replicate each to a peer, then report them."""
        reports: list[Any] = []
        blocks = [
            (s.block_id, s.topic, s.partition, s.start, s.until, s.count, s.data)
            for s in self.receivers.seal(b)
        ]
        for node, index in self.queue_parts.items():
            data, count = self._queue_block(node, b)
            blocks.append((f"in/{node}/{b}/{index}", "", 0, b, b + 1, count, data))
        for bid, topic, partition, start, until, count, data in blocks:
            self.store.put(bid, data, replace=True)
            holders = [self.id]
            for peer in self.peer_ids[:1]:
                try:
                    self._peer(peer).call(
                        "replicate", {"block": bid, "data": data}, timeout=FETCH_TIMEOUT_S
                    )
                    holders.append(peer)
                except RpcError as e:
                    log.warning("replicating %s to %s failed: %s", bid, peer, e)
            if topic:
                metrics.INPUT_RECORDS.labels(topic=topic, partition=str(partition)).inc(count)
            reports.append([bid, topic, partition, start, until, count, len(data), holders])
        return reports

    def _queue_block(self, node: int, b: int) -> tuple[bytes, int]:
        n = self.ssc.nodes[node]
        i = b - self.first
        values = n.args["batches"][i] if 0 <= i < len(n.args["batches"]) else n.args["default"]
        return encode_input_block("", 0, b, b + 1, list(values)), len(values)

    def _read_input(self, p: dict[str, Any]) -> int:
        """Rebuild a lost input block from Kafka by its logged offset range (or the queue)."""
        bid = p["block"]
        _, node, b, _idx = bid.split("/")
        if not p["topic"]:
            data, _ = self._queue_block(int(node), int(b))
        else:
            from ingest.reread import read_range

            n = self.ssc.nodes[int(node)]
            data = read_range(
                self.settings.kafka_client_config(**{"group.id": f"dstream-{self.app_id}-reread"}),
                p["topic"],
                p["partition"],
                p["from"],
                p["until"],
                bool(n.args.get("with_metadata")),
            )
        faults.crash_point("during_recovery")
        return self.store.put(bid, data, replace=True)

    def _checkpoint(self, spec: TaskSpec, block: Any) -> None:
        """Write a state partition to the checkpoint store, then tell the coordinator."""
        t0 = time.monotonic()
        items = list(block.state.items()) if isinstance(block, StateBlock) else unpack(block)
        try:
            nbytes = self.checkpoints.write_items(spec.node, spec.part, spec.batch, items)
            faults.crash_point("during_checkpoint")
            dt = time.monotonic() - t0
            metrics.CHECKPOINT_DURATION.observe(dt)
            metrics.CHECKPOINT_BYTES.set(nbytes)
            self.coordinator.call(
                "checkpointed",
                {
                    "node": spec.node,
                    "part": spec.part,
                    "batch": spec.batch,
                    "bytes": nbytes,
                    "seconds": dt,
                },
                timeout=30,
            )
        except Exception as e:  # a failed checkpoint only lengthens lineage
            log.warning("checkpoint of %s failed: %s", spec.id, e)

    # -- tasks -----------------------------------------------------------------------------
    def _fetch(self, locations: dict[str, list[str]], ranges: dict[str, Any] | None = None) -> Any:
        """The task's block reader: the local store first, then the holders the coordinator named.

        An input block is checked against the offset range the coordinator logged for it
        (*ranges*): a copy cut from another range (by a worker that was paused mid-seal, or
        before a coordinator restart) is stale. A stale local copy is dropped, a stale remote
        one skipped; with no good copy the task fails naming every holder that had none, and
        the coordinator re-reads the block from Kafka.
        """
        plan = self.plan
        assert plan is not None
        ranges = ranges or {}

        def fresh(bid: str, data: Any) -> bool:
            want = ranges.get(bid)
            if want is None or not isinstance(data, bytes | bytearray):
                return True
            try:
                return list(input_block_range(data)) == list(want)
            except CodecError:
                return False

        def fetch(bid: str, bucket: int) -> Any:
            gone: list[str] = []
            if self.store.has(bid):
                data = self.store.get(bid, bucket)
                if fresh(bid, data):
                    return data
                log.warning("dropping a stale copy of %s (not the logged offset range)", bid)
                self.store.free([bid])
            for addr in locations.get(bid, []):
                if addr == self.id:
                    continue
                if addr == CHECKPOINT:
                    _, node, b, part = bid.split("/")
                    items = self.checkpoints.read_items(int(node), int(part), int(b))
                    if plan.by_id[int(node)].kind == "state":
                        return StateBlock(dict(items), [])
                    return pack(items)
                try:
                    data = self._peer(addr).call(
                        "fetch", {"block": bid, "bucket": bucket}, timeout=FETCH_TIMEOUT_S
                    )
                except RemoteError:
                    gone.append(addr)
                    continue
                except RpcError as e:
                    log.info("fetch of %s from %s failed: %s", bid, addr, e)
                    continue
                if not fresh(bid, data):
                    log.warning("%s holds a stale copy of %s; skipping it", addr, bid)
                    gone.append(addr)
                    continue
                if bid.startswith("rd/") and plan.by_id[block_node(bid)].kind == "state":
                    return StateBlock.from_bytes(data)
                return data
            raise BlockMissing(bid, gone)

        return fetch

    def leased(self, incarnation: int) -> bool:
        """Whether this worker may still commit for tasks of *incarnation*.

        False once the coordinator declared it lost, and as soon as its last acknowledged
        heartbeat is older than the lease (a paused process finds this out on waking,
        before it could commit anything).
        """
        return incarnation == self.incarnation and time.monotonic() - self.last_ok < self.lease

    def _run_task(
        self,
        spec: TaskSpec,
        attempt: int,
        locations: dict[str, list[str]],
        time_ms: int,
        incarnation: int = 0,
        ranges: dict[str, Any] | None = None,
    ) -> None:
        assert self.executor is not None
        t0 = time.monotonic()
        try:
            res = self.executor.run(spec, self._fetch(locations, ranges))
            if self.slow > 1.0:
                time.sleep((self.slow - 1.0) * (time.monotonic() - t0) + 0.02 * self.slow)
            faults.crash_point("after_compute")
            if (spec.id, attempt) in self.cancelled:
                return
            size = 0
            if spec.kind == "output":
                if not self._commit(spec, attempt, time_ms, res.records, incarnation):
                    return
            else:
                size = self.store.put(spec.id, res.block)
                every = self.settings.checkpoint_every_batches
                if spec.node in self.stateful and (spec.batch + 1) % every == 0:
                    self.ckpt_pool.submit(self._checkpoint, spec, res.block)
            if res.dead_letters:
                self.sinks.dead_letters(res.dead_letters)
            dt = time.monotonic() - t0
            metrics.TASK_DURATION.labels(stage=spec.stage.split(":")[0]).observe(dt)
            self.coordinator.call(
                "task_done",
                {
                    "task": spec.id,
                    "attempt": attempt,
                    "worker": self.id,
                    "size": size,
                    "input_records": res.input_records,
                    "dead": len(res.dead_letters),
                    "seconds": dt,
                },
                timeout=30,
            )
        except BlockMissing as e:
            self._report_failure(spec, attempt, str(e), e.block_id, e.gone_from)
        except FencedError as e:  # another attempt or worker owns the output: retry is safe
            log.warning("task %s attempt %d fenced: %s", spec.id, attempt, e)
            self._report_failure(spec, attempt, f"fenced: {e}", None)
        except DStreamError as e:  # an expected failure (a sink or dependency): one line
            if not self.stopping.is_set():
                log.warning("task %s attempt %d failed: %s", spec.id, attempt, e)
                self._report_failure(spec, attempt, f"{type(e).__name__}: {e}", None)
        except Exception as e:
            if self.stopping.is_set():
                return  # shutting down: the coordinator reruns what did not finish
            log.exception("task %s attempt %d failed", spec.id, attempt)
            self._report_failure(spec, attempt, f"{type(e).__name__}: {e}", None)

    def _commit(
        self, spec: TaskSpec, attempt: int, time_ms: int, records: list[Any], incarnation: int
    ) -> bool:
        assert self.plan is not None
        while True:
            if (spec.id, attempt) in self.cancelled or not self.leased(incarnation):
                return False
            answer = self.coordinator.call(
                "request_commit",
                {"task": spec.id, "attempt": attempt, "worker": self.id},
                timeout=30,
            )
            if answer == "granted":
                break
            if answer == "denied":
                return False
            time.sleep(COMMIT_WAIT_S)
        self.sinks.commit(
            self.plan.by_id[spec.node],
            spec,
            time_ms,
            records,
            guard=lambda: self.leased(incarnation),
        )
        return True

    def _report_failure(
        self,
        spec: TaskSpec,
        attempt: int,
        error: str,
        missing: str | None,
        gone_from: list[str] | None = None,
    ) -> None:
        try:
            self.coordinator.call(
                "task_failed",
                {
                    "task": spec.id,
                    "attempt": attempt,
                    "worker": self.id,
                    "error": error,
                    "missing": missing,
                    "gone_from": gone_from or [],
                },
                timeout=30,
            )
        except RpcError as e:
            log.warning("could not report failure of %s: %s", spec.id, e)


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
    """
    done = threading.Event()

    def _stop(_sig: int, _frm: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    w = Worker(settings, app_path, app_id)
    if done.is_set():
        return 0
    w.start()
    done.wait()
    log.info("worker %s stopping", w.id)
    if not w.stop(stop_deadline_s):
        log.warning("tasks still running after %.0f s abandoned (they are rerun)", stop_deadline_s)
    log.info("worker %s stopped", w.id)
    return 0
