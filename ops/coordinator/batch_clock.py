"""The batch clock: cut a batch every interval, log its offset ranges, then schedule it.

:class:`BatchClock` runs the ``batch-clock`` thread of the leader (Spark's
``JobGenerator``): it waits for the fleet, sends the partition assignment, replays the
batches an earlier leader logged but did not finish, then every interval seals batch
``b`` on every worker (receivers cut and replicate their blocks and report them), writes
the batch's offset ranges to the metadata log, and only then hands the batch to the
scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from engine.scheduler import Scheduler
from ops import metrics
from ops import protocol as wire
from ops.coordinator.completion import BatchInfo, Completion
from ops.coordinator.dispatch import Dispatcher
from ops.coordinator.durable import DurableWriter
from ops.coordinator.membership import CALL_TIMEOUT_S, Membership, WorkerInfo
from ops.coordinator.receivers import ReceiverTracker
from state.metalog import MetaLog

log = logging.getLogger("dstream.coordinator")

#: Seal calls wait this long for a worker; a worker slower than that is treated as lost
#: for this batch (its partitions' records simply land in its next block).
SEAL_TIMEOUT_S = CALL_TIMEOUT_S
#: The longest the first batch waits for ``--expect-workers`` (Spark's default
#: ``spark.scheduler.maxRegisteredResourcesWaitingTime``); it then starts with whoever joined.
REGISTRATION_WAIT_S = 30.0
#: After a restart or a takeover, the live workers rejoin within a heartbeat or two: the
#: first batch waits at most this long for ``--expect-workers`` (a scaled-down fleet has
#: fewer than the chart's replica count says).
REJOIN_WAIT_S = 2.0


class BatchClock:
    """Seals, logs and schedules one batch per interval.

    Args:
        interval_s: the batch interval.
        expect_workers: how many workers the first batch waits for.
        next_batch: the first batch this leader cuts.
        replay: batches logged by an earlier leader but not complete (run again).
        fresh: a new app (waits :data:`REGISTRATION_WAIT_S` for its fleet, not
            :data:`REJOIN_WAIT_S`).
        rate_cap: the per-partition cap to seal with (None: the workers' own).
        The others are the roles it drives; the lock is the coordinator's.

    """

    def __init__(
        self,
        *,
        interval_s: float,
        expect_workers: int,
        next_batch: int,
        replay: list[int],
        fresh: bool,
        scheduler: Scheduler,
        membership: Membership,
        receivers: ReceiverTracker,
        completion: Completion,
        dispatcher: Dispatcher,
        metalog: MetaLog,
        durable: DurableWriter,
        epoch: int,
        io: Executor,
        lock: threading.RLock,
        stopping: threading.Event,
        may_act: Callable[[str], bool],
        rate_cap: Callable[[], int | None],
    ) -> None:
        self.interval_s = interval_s
        metrics.BATCH_INTERVAL.set(interval_s)
        self.expect_workers = expect_workers
        self.next_batch = next_batch
        self.replay = replay
        self.fresh = fresh
        self.scheduler = scheduler
        self.membership = membership
        self.receivers = receivers
        self.completion = completion
        self.dispatcher = dispatcher
        self.metalog = metalog
        self.durable = durable
        self.epoch = epoch
        self.io = io
        self.lock = lock
        self.stopping = stopping
        self.may_act = may_act
        self.rate_cap = rate_cap

    def run(self) -> None:
        """The ``batch-clock`` thread: until stopped, one batch every interval."""
        # a new app waits for its fleet; one that ran before resumes with the workers that
        # rejoin (they do within a heartbeat or two), not with the number it was told
        if not self.await_workers(REGISTRATION_WAIT_S if self.fresh else REJOIN_WAIT_S):
            return
        try:
            self.send_assignments()
            with self.lock:
                self.replay_logged()
        except Exception:
            if self.stopping.is_set():
                return  # stopped while assigning (the I/O pool is already shut down)
            raise
        # the first batch is cut at once: after a takeover, the records since the last
        # leader's last batch are already waiting
        start = time.time()
        k = -1
        while not self.stopping.is_set():
            k += 1
            wake = start + k * self.interval_s
            delay = wake - time.time()
            if delay > 0 and self.stopping.wait(delay):
                return
            try:
                self.seal_batch(int(wake * 1000))
            except Exception:
                if self.stopping.is_set():
                    return  # stopping (e.g. the metadata was lost): already said, once
                log.exception("sealing a batch failed")

    def await_workers(self, wait_s: float) -> bool:
        """Wait for ``expect_workers`` workers, or *wait_s* and at least one; False if stopped.

        Like Spark's ``minRegisteredResourcesRatio`` with its 30 s
        ``maxRegisteredResourcesWaitingTime``: starting with every expected worker avoids
        moving partitions right after the first batch, but a missing pod never holds the
        app back for long.
        """
        start = time.monotonic()
        while not self.stopping.wait(0.05):
            with self.lock:
                n = len(self.membership)
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

    def send_assignments(self) -> None:
        """Assign the input partitions afresh and send ``assign`` to every worker at once.

        Waits for every answer (outside the lock, before the next seal: that keeps the
        offsets exact).
        """
        with self.lock:
            calls = self._assignments()
        self._send(calls)

    def _assignments(self) -> list[tuple[WorkerInfo, wire.Assign]]:
        msgs = self.receivers.assign(self.membership.ids())
        return [(self.membership.workers[w], m) for w, m in msgs.items()]

    def _send(self, calls: list[tuple[WorkerInfo, wire.Assign]]) -> None:
        futures = [(w, self.io.submit(w.client.send, m, SEAL_TIMEOUT_S)) for w, m in calls]
        for w, f in futures:
            try:
                f.result()
            except Exception as e:
                log.warning("assigning partitions to %s failed: %s", w.id, e)

    def replay_logged(self) -> None:
        """Batches an earlier coordinator logged but did not finish: run them again.

        Their inputs are re-read from Kafka by the logged offset ranges, their state rebuilt
        from the last checkpoints; sinks skip what was already committed. Lock held.
        """
        for b in self.replay:
            if b < self.next_batch:
                now = time.monotonic()
                ranges = self.receivers.ranges.get(b, {})
                info = BatchInfo(b, self.receivers.times.get(b, 0), now, ranges=ranges)
                info.records = sum(r.records for r in ranges.values())
                self.completion.started(info)
                self.scheduler.add_batch(b, now)
        if self.replay:
            log.info("replaying batches %d..%d of an earlier run", self.replay[0], self.replay[-1])
        self.dispatcher.dispatch()

    def seal_batch(self, time_ms: int) -> None:
        """Cut the next batch (stamped *time_ms*), log its ranges, then schedule it."""
        if not self.may_act("seal a batch"):
            return
        with self.lock:
            b = self.next_batch
            self.next_batch += 1
            workers = list(self.membership.workers.values())
        seal = wire.Seal(b, self.rate_cap())
        futures = {w.id: self.io.submit(w.client.send, seal, SEAL_TIMEOUT_S) for w in workers}
        reports: list[wire.BlockReport] = []
        for wid, f in futures.items():
            try:
                reports.extend(wire.BlockReport.from_wire(r) for r in f.result())
            except Exception as e:
                log.warning("seal of batch %d on %s failed: %s", b, wid, e)
        info = BatchInfo(b, time_ms, time.monotonic())
        with self.lock:
            reports = self.receivers.continuing(reports)
            info.ranges = self.receivers.record_batch(b, time_ms, reports)
        info.records = sum(r.range.records for r in reports)
        # the offset ranges are durable before anything is scheduled
        self.durable.write(
            "logging a batch", self.metalog.log_batch, self.epoch, b, info.ranges, time_ms
        )
        calls: list[Any] = []
        with self.lock:
            self.receivers.advance(reports)
            live = len(self.membership)
            for r in reports:
                if len(r.holders) < min(2, live):
                    self.receivers.under_replicated += 1
                for h in r.holders:
                    self.scheduler.block_added(r.block, h, r.size)
            self.completion.started(info)
            metrics.BATCH_RECORDS.observe(info.records)
            self.scheduler.add_batch(b, info.sealed_at)
            metrics.BATCHES_PENDING.set(len(self.scheduler.batches))
            if self.receivers.dirty:
                calls = self._assignments()
            self.dispatcher.dispatch()
        if calls:
            self._send(calls)
