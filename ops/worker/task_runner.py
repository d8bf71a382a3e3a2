"""The task runner: a worker's slots, running the attempts the coordinator launches.

:class:`TaskRunner` runs each launched attempt on a task slot: it reads the task's input
blocks (locally, from the peers the coordinator named, or from the checkpoint store),
runs it on the :class:`engine.executor.Executor`, stores the result or - for an output
task - asks for the commit right and commits through the sinks, writes state checkpoints
every ``checkpoint_every_batches`` batches, and reports the outcome (``task_done`` or a
typed ``task_failed``). It decides nothing: what runs and what commits is the
coordinator's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.codec import CodecError, input_block_range, pack, unpack
from engine.errors import (
    DStreamError,
    FencedError,
    MetadataLostError,
    NotLeaderError,
    RpcError,
    UserFunctionError,
)
from engine.executor import BlockMissing, Executor, StateBlock
from engine.plan import Plan, TaskSpec, block_batch, block_node, block_part
from engine.scheduler import CHECKPOINT
from ops import faults, metrics
from ops import protocol as wire
from ops.config import Settings
from ops.leader_client import LeaderClient
from ops.rpc import ConnectionLost, RemoteError, RpcClient, RpcTimeout
from ops.sinks import DEFAULT_MAX_MESSAGE_BYTES, FleetSinks, bound_letter, encode_records
from ops.worker.peers import PeerHealth
from state.blockstore import BlockStore
from state.checkpoint import RedisCheckpointStore

log = logging.getLogger("dstream.worker")

#: Back-off between commit-right polls while earlier batches of the partition commit.
COMMIT_WAIT_S = 0.005
#: Back-off between commit-right polls while no coordinator answers as the leader.
NOT_LEADER_WAIT_S = 0.1
#: How long a task's report (done, failed) is retried while no coordinator answers as the
#: leader: longer than a lease lapse (a leader cut off from Redis for a moment, a takeover
#: by a standby). A report that is never heard leaves its task running on the coordinator,
#: and its batch (and every later one, outputs commit in order) waiting behind it.
REPORT_RETRY_S = 60.0


class TaskRunner:
    """Runs launched attempts on ``task_slots`` threads and reports them.

    Args:
        settings: slots and checkpoint period.
        store: the worker's block store (inputs read, results written).
        coordinator: the client of the leading coordinator (reports, commit rights).
        peer: the client of a peer worker, by address (fetches).
        checkpoints: where state partitions are checkpointed and read back.
        sinks: the output sinks (commits).
        worker_id: this worker's address, once it serves.
        leased: whether tasks of an incarnation may still commit (the membership's).
        stopping: set when the worker stops (failures are then not reported).
        peer_health: peers that missed a deadline lately (fetches try them last).

    Nothing runs until :meth:`configure` gave it the plan (at registration).

    """

    def __init__(
        self,
        settings: Settings,
        store: BlockStore,
        coordinator: LeaderClient,
        peer: Callable[[str], RpcClient],
        checkpoints: RedisCheckpointStore,
        sinks: FleetSinks,
        worker_id: Callable[[], str],
        leased: Callable[[int], bool],
        stopping: threading.Event,
        peer_health: PeerHealth | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.coordinator = coordinator
        self.peer = peer
        self.checkpoints = checkpoints
        self.sinks = sinks
        self.worker_id = worker_id
        self.leased = leased
        self.stopping = stopping
        self.peer_health = peer_health or PeerHealth(settings.heartbeat_timeout)
        self.pool = ThreadPoolExecutor(settings.task_slots, thread_name_prefix="task")
        #: one thread: checkpoints are written in order, off the task path
        self.ckpt_pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.cancelled: set[tuple[str, int]] = set()
        self.plan: Plan | None = None
        self.executor: Executor | None = None
        self.stateful: set[int] = set()
        self.slow = faults.slow_factor()

    @property
    def max_message_bytes(self) -> int:
        """The producer's ``message.max.bytes``: a bigger output record is dead-lettered."""
        got = self.settings.kafka_config.get("message.max.bytes")
        return int(got) if got else DEFAULT_MAX_MESSAGE_BYTES

    def configure(self, plan: Plan, executor: Executor) -> None:
        """Called once, at the first registration: the compiled graph and its executor."""
        self.plan = plan
        self.executor = executor
        self.stateful = {n.id for n in plan.stateful_nodes()}

    def launch(self, msg: wire.Launch, incarnation: int) -> bool:
        """Queue an attempt on a slot (it runs under the worker's current *incarnation*)."""
        self.pool.submit(
            self.run, msg.spec, msg.attempt, msg.locations, msg.time_ms, incarnation, msg.ranges
        )
        return True

    def cancel(self, msg: wire.Cancel) -> bool:
        """Another attempt won: this one neither commits nor reports."""
        self.cancelled.add((msg.task, msg.attempt))
        return True

    def threads(self) -> list[threading.Thread]:
        """The slot and checkpoint threads (the worker joins them when it stops)."""
        return [*self.pool._threads, *self.ckpt_pool._threads]  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.ckpt_pool.shutdown(wait=False)

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
            done = wire.Checkpointed(spec.node, spec.part, spec.batch, nbytes, dt)
            self.coordinator.call("checkpointed", done.to_wire(), timeout=30)
        except Exception as e:  # a failed checkpoint only lengthens lineage
            metrics.CHECKPOINT_FAILURES.inc()
            log.warning("checkpoint of %s failed: %s", spec.id, e)

    def fetcher(
        self, locations: Mapping[str, list[str]], ranges: dict[str, Any] | None = None
    ) -> Any:
        """The task's block reader: the local store first, then the holders the coordinator named.

        An input block is checked against the offset range the coordinator logged for it
        (*ranges*): a copy cut from another range (by a worker that was paused mid-seal, or
        before a coordinator restart) is stale. A stale local copy is dropped, a stale remote
        one skipped; with no good copy the task fails naming every holder that had none, and
        the coordinator re-reads the block from Kafka.

        Each peer gets ``Settings.peer_deadline_s`` to answer; holders that missed a
        deadline lately are tried last. A holder that misses it is named among those
        without the block: the coordinator then rebuilds it (recompute or re-read), which
        is always correct, rather than sending the task back to a paused peer until the
        peer is declared lost.
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
            me = self.worker_id()
            for addr in self.peer_health.order(locations.get(bid, [])):
                if addr == me:
                    continue
                if addr == CHECKPOINT:
                    node = block_node(bid)
                    items = self.checkpoints.read_items(node, block_part(bid), block_batch(bid))
                    if plan.by_id[node].kind == "state":
                        return StateBlock(dict(items), [])
                    return pack(items)
                try:
                    data = self.peer(addr).call(
                        "fetch",
                        wire.Fetch(bid, bucket).to_wire(),
                        timeout=self.settings.peer_deadline_s,
                    )
                except RemoteError:
                    gone.append(addr)
                    continue
                except RpcTimeout as e:
                    self.peer_health.missed(addr)
                    log.info("fetch of %s from %s missed its deadline: %s", bid, addr, e)
                    gone.append(addr)
                    continue
                except RpcError as e:
                    self.peer_health.missed(addr)
                    log.info("fetch of %s from %s failed: %s", bid, addr, e)
                    continue
                self.peer_health.answered(addr)
                if not fresh(bid, data):
                    log.warning("%s holds a stale copy of %s; skipping it", addr, bid)
                    gone.append(addr)
                    continue
                if bid.startswith("rd/") and plan.by_id[block_node(bid)].kind == "state":
                    return StateBlock.from_bytes(data)
                return data
            raise BlockMissing(bid, gone)

        return fetch

    def run(
        self,
        spec: TaskSpec,
        attempt: int,
        locations: Mapping[str, list[str]],
        time_ms: int,
        incarnation: int = 0,
        ranges: dict[str, Any] | None = None,
    ) -> None:
        assert self.executor is not None
        t0 = time.monotonic()
        try:
            res = self.executor.run(spec, self.fetcher(locations, ranges))
            if self.slow > 1.0:
                time.sleep((self.slow - 1.0) * (time.monotonic() - t0) + 0.02 * self.slow)
            faults.crash_point("after_compute")
            if (spec.id, attempt) in self.cancelled:
                return
            size = 0
            letters = list(res.dead_letters)
            if spec.kind == "output":
                assert self.plan is not None
                records, unencodable = encode_records(
                    self.plan.by_id[spec.node],
                    spec,
                    res.records,
                    self.max_message_bytes,
                    fail=self.settings.fail_on_error,
                )
                letters += unencodable
                if not self._commit(spec, attempt, time_ms, records, incarnation):
                    return
            else:
                size = self.store.put(spec.id, res.block)
                every = self.settings.checkpoint_every_batches
                if spec.node in self.stateful and (spec.batch + 1) % every == 0:
                    self.ckpt_pool.submit(self._checkpoint, spec, res.block)
            # the coordinator commits the letters of the task's first accepted attempt
            # (once per batch, transactionally); bounded so none can be refused by Kafka
            bound = self.settings.dead_letter_max_bytes
            letters = [bound_letter(d, bound) for d in letters]
            dt = time.monotonic() - t0
            metrics.TASK_DURATION.labels(stage=spec.stage.split(":")[0]).observe(dt)
            done = wire.TaskDone(
                spec.id,
                attempt,
                self.worker_id(),
                size,
                res.input_records,
                len(letters),
                dt,
                letters,
            )
            self._report("task_done", done.to_wire())
        except BlockMissing as e:
            self._report_failure(
                spec, attempt, str(e), wire.FailureKind.MISSING_INPUT, e.block_id, e.gone_from
            )
        except FencedError as e:  # another attempt or worker owns the output: retry is safe
            log.warning("task %s attempt %d fenced: %s", spec.id, attempt, e)
            self._report_failure(spec, attempt, f"fenced: {e}", wire.FailureKind.FENCED)
        except MetadataLostError as e:  # Redis lost the app's metadata: fatal, not retried
            log.error("task %s attempt %d: %s", spec.id, attempt, e)
            self._report_failure(spec, attempt, str(e), wire.FailureKind.METADATA_LOST)
        except DStreamError as e:  # an expected failure (a sink or dependency): one line
            if not self.stopping.is_set():
                log.warning("task %s attempt %d failed: %s", spec.id, attempt, e)
                kind = (
                    wire.FailureKind.APP_FAILED
                    if isinstance(e, UserFunctionError)
                    else wire.FailureKind.ERROR
                )
                self._report_failure(spec, attempt, f"{type(e).__name__}: {e}", kind)
        except Exception as e:
            if self.stopping.is_set():
                return  # shutting down: the coordinator reruns what did not finish
            log.exception("task %s attempt %d failed", spec.id, attempt)
            self._report_failure(spec, attempt, f"{type(e).__name__}: {e}", wire.FailureKind.ERROR)

    def _commit(
        self, spec: TaskSpec, attempt: int, time_ms: int, records: list[Any], incarnation: int
    ) -> bool:
        assert self.plan is not None
        while True:
            if (spec.id, attempt) in self.cancelled:
                return False
            if not self.leased(incarnation):
                # told so (a fenced failure), or the attempt would stay running on a
                # coordinator that did not declare this worker lost
                msg = f"{spec.id}: this worker's lease lapsed before the commit"
                raise FencedError(msg)
            ask = wire.RequestCommit(spec.id, attempt, self.worker_id())
            try:
                answer = wire.CommitAnswer(
                    self.coordinator.call("request_commit", ask.to_wire(), timeout=30)
                )
            except NotLeaderError:
                # the leader's lease lapsed (or it was replaced): wait while this worker is
                # still leased; past that the attempt is abandoned (the next leader, or this
                # one once it leads again and declares this worker lost, reruns it)
                time.sleep(NOT_LEADER_WAIT_S)
                continue
            if answer is wire.CommitAnswer.GRANTED:
                break
            if answer is wire.CommitAnswer.DENIED:
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
        kind: wire.FailureKind,
        missing: str | None = None,
        gone_from: list[str] | None = None,
    ) -> None:
        msg = wire.TaskFailed(
            spec.id, attempt, self.worker_id(), error, kind, missing, gone_from or []
        )
        try:
            self._report("task_failed", msg.to_wire())
        except RpcError as e:
            log.warning("could not report failure of %s: %s", spec.id, e)

    def _report(self, method: str, params: Any) -> None:
        """Tell the leader how an attempt ended, retrying while none answers as the leader.

        A leader whose lease lapsed answers ``not leader`` until it renews it (or a standby
        takes over); the report is sent again until one leader hears it, the worker stops,
        or :data:`REPORT_RETRY_S` passes. So is one whose connection dropped (the
        heartbeat drops a connection that stopped answering, see
        ``ops.worker.membership``): a report the leader already had is ignored, as are
        attempts a new leader did not launch.
        """
        deadline = time.monotonic() + REPORT_RETRY_S
        delay = NOT_LEADER_WAIT_S
        while True:
            try:
                self.coordinator.call(method, params, timeout=30)
                return
            except (NotLeaderError, ConnectionLost):
                if time.monotonic() + delay > deadline or self.stopping.wait(delay):
                    raise
                delay = min(1.0, delay * 2)
