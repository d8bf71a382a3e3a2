"""Dispatch: the scheduler's instructions become RPCs to workers, and their answers events.

:class:`Dispatcher` is the fleet's :class:`engine.dispatch.InstructionHandler`: it
launches, cancels and frees on the worker the scheduler names, re-replicates and re-reads
lost blocks, and feeds the outcome of each call (a launch that failed, a block copied or
rebuilt) back to the scheduler. It also takes the workers' task reports (``task_done``,
``task_failed``, ``request_commit``). Instructions are issued with the coordinator's lock
held; the calls run on the I/O pool, which takes the lock again to report back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from engine.dispatch import InstructionHandler, apply, dispatch
from engine.errors import RpcError
from engine.scheduler import (
    DONE,
    BatchCompleted,
    CancelTask,
    FreeBlocks,
    Instruction,
    LaunchTask,
    ReadInput,
    Replicate,
    Scheduler,
    ShuffleLocations,
)
from ops import metrics
from ops import protocol as wire
from ops.coordinator.completion import Completion
from ops.coordinator.membership import CALL_TIMEOUT_S, Membership, WorkerClient, WorkerInfo
from ops.coordinator.receivers import ReceiverTracker
from ops.coordinator.retries import RetryWatch

log = logging.getLogger("dstream.coordinator")

#: A re-replication copies one block between two workers (64 MiB at most).
REPLICATE_TIMEOUT_S = 60.0
#: A re-read fetches one block's offset range from Kafka.
READ_INPUT_TIMEOUT_S = 120.0


class Dispatcher(InstructionHandler):
    """Turns scheduler instructions into worker calls and worker reports into events.

    Args:
        scheduler: the pure state machine it drives.
        membership: the workers to call.
        receivers: the logged offset ranges (input blocks are checked against them).
        completion: batch timings, and where completed batches go.
        io: runs the calls off the lock.
        lock: the coordinator's lock (held by callers of :meth:`dispatch`).
        may_act: the leader check (a coordinator in doubt grants no commit).
        retry_alert_s: a task failing for longer than this is reported once at ERROR
            (``task_retry_alert_seconds``; retries back off in the scheduler).

    """

    def __init__(
        self,
        scheduler: Scheduler,
        membership: Membership,
        receivers: ReceiverTracker,
        completion: Completion,
        io: Executor,
        lock: threading.RLock,
        may_act: Callable[[str], bool],
        retry_alert_s: float = 60.0,
    ) -> None:
        self.scheduler = scheduler
        self.membership = membership
        self.receivers = receivers
        self.completion = completion
        self.io = io
        self.lock = lock
        self.may_act = may_act
        self._next_reader = 0
        #: tasks failing now, reported once when failing longer than the bound
        self.retries = RetryWatch(retry_alert_s)

    # -- instructions (lock held) ----------------------------------------------------------
    def dispatch(self) -> None:
        """Tick the scheduler and carry out what it says (called with the lock held).

        Launches are sent in chunks as they are placed (:func:`engine.dispatch.dispatch`).
        """
        dispatch(self.scheduler, self, time.monotonic)

    def apply(self, instructions: list[Instruction]) -> None:
        apply(instructions, self)

    def launch(self, ins: LaunchTask) -> None:
        spec = ins.spec
        time_ms = self.completion.task_launched(spec.batch, time.monotonic())
        if ins.speculative:
            metrics.SPECULATIVE_LAUNCHED.inc()
        locations = self.scheduler.locations_of(spec)
        w = self.membership.get(ins.worker)
        if w is None:
            return
        msg = wire.Launch(
            spec,
            ins.attempt,
            locations,
            # input blocks are checked against their logged offset ranges (stale copies);
            # a reduce's map outputs are none of them
            self.receivers.input_ranges(
                locations.others if isinstance(locations, ShuffleLocations) else locations
            ),
            time_ms if time_ms is not None else self.receivers.times.get(spec.batch, 0),
        )
        self.io.submit(self._send_launch, w, msg)

    def free(self, ins: FreeBlocks) -> None:
        w = self.membership.get(ins.worker)
        if w is not None:
            self.io.submit(quiet_send, w.client, wire.Free(list(ins.block_ids)))

    def cancel(self, ins: CancelTask) -> None:
        w = self.membership.get(ins.worker)
        if w is not None:
            self.io.submit(quiet_send, w.client, wire.Cancel(ins.task_id, ins.attempt))

    def batch_completed(self, ins: BatchCompleted) -> None:
        self.completion.batch_completed(ins.batch, time.monotonic())

    def read_input(self, ins: ReadInput) -> None:
        """Have a live worker (round robin) rebuild an input block from its logged range.

        Only workers the scheduler runs tasks on: not one set apart for missing its seal.
        """
        bid = ins.block_id
        rng = self.receivers.range_of(bid)
        workers = [w for w in self.membership.ids() if w in self.scheduler.slots]
        if rng is None or not workers:
            log.error(
                "cannot rebuild %s: %s",
                bid,
                "no offset range logged" if rng is None else "no live worker",
            )
            return
        w = self.membership.workers[workers[self._next_reader % len(workers)]]
        self._next_reader += 1
        self.io.submit(self._send_read_input, w, wire.ReadInput(bid, rng))

    def replicate(self, ins: Replicate) -> None:
        src = self.membership.get(ins.source)
        if src is not None:
            self.io.submit(self._send_replicate, src, ins)

    # -- calls (I/O pool) ------------------------------------------------------------------
    def _send_launch(self, w: WorkerInfo, msg: wire.Launch) -> None:
        try:
            w.client.send(msg, timeout=CALL_TIMEOUT_S)
        except RpcError as e:
            log.info("launch of %s on %s failed: %s", msg.spec.id, w.id, e)
            with self.lock:
                self.scheduler.task_failed(msg.spec.id, msg.attempt, w.id, now=time.monotonic())
                self.dispatch()

    def _send_replicate(self, src: WorkerInfo, ins: Replicate) -> None:
        try:
            size = src.client.send(
                wire.ReplicateTo(ins.block_id, ins.target), timeout=REPLICATE_TIMEOUT_S
            )
        except RpcError as e:
            log.warning("re-replicating %s to %s failed: %s", ins.block_id, ins.target, e)
            return
        with self.lock:
            self.scheduler.block_added(ins.block_id, ins.target, size)

    def _send_read_input(self, w: WorkerInfo, msg: wire.ReadInput) -> None:
        try:
            size = w.client.send(msg, timeout=READ_INPUT_TIMEOUT_S)
        except RpcError as e:
            log.warning("re-reading %s on %s failed: %s", msg.block, w.id, e)
            size = None
        with self.lock:
            if size is None:
                self.scheduler.read_failed(msg.block)
            else:
                self.scheduler.block_added(msg.block, w.id, size)
            self.dispatch()

    # -- task reports (RPC handlers) -------------------------------------------------------
    def task_done(self, msg: wire.TaskDone) -> bool:
        """The first accepted completion of a task: its dead letters are kept for its batch."""
        with self.lock:
            before = self.scheduler.stats.speculative_won
            t = self.scheduler.tasks.get(msg.task) or self.scheduler.lineage.get(msg.task)
            open_before = t is not None and t.status != DONE
            out = self.scheduler.task_finished(
                msg.task, msg.attempt, msg.worker, time.monotonic(), msg.size
            )
            if self.scheduler.stats.speculative_won > before:
                metrics.SPECULATIVE_WON.inc()
            if t is not None and open_before and t.status == DONE:
                # accepted (first finisher): before ``out`` may complete the batch
                self.completion.task_letters(t.spec.batch, msg.task, msg.letters)
                if self.retries.succeeded(msg.task) is not None:
                    log.warning("task %s succeeded after failing for a long time", msg.task)
                    metrics.STUCK_TASKS.set(self.retries.stuck)
            self.apply(out)
            self.dispatch()
        return True

    def task_failed(self, msg: wire.TaskFailed) -> bool:
        """Retry the task (after rebuilding a missing input); an app failure is not here."""
        with self.lock:
            self.scheduler.task_failed(
                msg.task,
                msg.attempt,
                msg.worker,
                msg.missing,
                now=time.monotonic(),
                gone_from=msg.gone_from,
            )
            metrics.TASKS_RETRIED.inc()
            if not msg.missing:
                log.warning("task %s failed on %s: %s", msg.task, msg.worker, msg.error)
                sched = self.scheduler
                self.retries.forget([*sched.tasks, *sched.lineage])
                stuck = self.retries.failed(msg.task, msg.error, time.monotonic())
                if stuck is not None:
                    log.error("%s", stuck)
                metrics.STUCK_TASKS.set(self.retries.stuck)
            self.dispatch()
        return True

    def request_commit(self, msg: wire.RequestCommit) -> wire.CommitAnswer:
        """The commit right of the attempt's (batch, output partition), at most once."""
        with self.lock:
            if not self.may_act("grant a commit"):
                return wire.CommitAnswer.WAIT
            if msg.worker not in self.membership:
                return wire.CommitAnswer.DENIED  # a worker declared lost holds no right
            return wire.CommitAnswer(self.scheduler.request_commit(msg.task, msg.attempt))


def quiet_send(client: WorkerClient, msg: Any) -> None:
    """Send *msg*, logging a failure at debug level (free, cancel: best effort)."""
    try:
        client.send(msg, timeout=CALL_TIMEOUT_S)
    except RpcError as e:
        log.debug("%s failed: %s", wire.method_of(msg), e)
