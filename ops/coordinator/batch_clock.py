"""The batch clock: cut a batch every interval, log its offset ranges, then schedule it.

:class:`BatchClock` runs the ``batch-clock`` thread of the leader (Spark's
``JobGenerator``): it waits for the fleet, sends the partition assignment, replays the
batches an earlier leader logged but did not finish, then every interval seals batch
``b`` on every worker (receivers cut and replicate their blocks and report them), writes
the batch's offset ranges to the metadata log, and only then hands the batch to the
scheduler.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from concurrent import futures
from concurrent.futures import Executor, Future
from typing import Any, NamedTuple

from engine.scheduler import Scheduler
from ops import metrics
from ops import protocol as wire
from ops.coordinator.bounded import POLL_S, Pacer, is_behind, reached
from ops.coordinator.completion import BatchInfo, Completion
from ops.coordinator.dispatch import Dispatcher, quiet_send
from ops.coordinator.durable import DurableWriter
from ops.coordinator.membership import CALL_TIMEOUT_S, Membership, WorkerInfo
from ops.coordinator.receivers import ReceiverTracker
from state.metalog import MetaLog

log = logging.getLogger("dstream.coordinator")

#: A seal call's own timeout (the RPC gives up on the worker after it).
SEAL_TIMEOUT_S = CALL_TIMEOUT_S
#: The batch is cut without a worker whose seal answer takes longer than half a batch
#: interval (at least this long): a paused or overloaded worker costs the others less than
#: one interval, not the heartbeat timeout. Its partitions get empty ranges for that batch;
#: while its answer is outstanding it is not sealed again, and once it comes the
#: partitions are read again from their logged position (``ReceiverTracker.continuing``).
#: Meanwhile the scheduler runs its work elsewhere (``Scheduler.set_unresponsive``).
SEAL_WAIT_MIN_S = 0.25
#: share of the batch interval the clock waits for seal answers (see ``SEAL_WAIT_MIN_S``)
SEAL_WAIT_FRACTION = 0.5
#: How much longer than the others a worker already set apart (a missed ping) is waited
#: for at a seal: an answer within it takes the worker back at once.
APART_GRACE_S = 0.05
#: The longest the first batch waits for ``--expect-workers`` (Spark's default
#: ``spark.scheduler.maxRegisteredResourcesWaitingTime``); it then starts with whoever joined.
REGISTRATION_WAIT_S = 30.0
#: After a restart or a takeover, the live workers rejoin within a heartbeat or two: the
#: first batch waits at most this long for ``--expect-workers`` (a scaled-down fleet has
#: fewer than the chart's replica count says).
REJOIN_WAIT_S = 2.0
#: A finished bounded run waits at most this long for the metadata log to mark its last
#: batch done (written after the batch's dead letters commit) before it says it finished.
FINISH_DURABLE_WAIT_S = 30.0


class Sealed(NamedTuple):
    """What a round of seals brought: the block reports and the workers that answered."""

    reports: list[wire.BlockReport]
    answered: set[str]


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
        #: worker id -> its seal call not answered in time (not sealed again meanwhile)
        self.late: dict[str, Future[Any]] = {}

    def run(self) -> None:
        """The ``batch-clock`` thread: until stopped, one batch every interval.

        Batch ``k`` of this leader is stamped ``start + k * interval``; while the input is
        behind (a backlog, a bounded run) it is cut as soon as the previous batch
        completed, not at that time (:class:`.bounded.Pacer`). A bounded run stops
        cutting once every partition was logged up to its stop offset, and finishes
        (:meth:`finish`) when its last batch completed.
        """
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
        if self.before_first_cut is not None and not self.before_first_cut():
            return  # stopped (or the app failed) while loading its tables
        # the first batch is cut at once: after a takeover, the records since the last
        # leader's last batch are already waiting
        pacer = Pacer(self.interval_s, time.time())
        self.started_at = time.monotonic()
        with self.lock:
            for b in self.replay:
                if b < self.next_batch:
                    self.sealed_batches += 1
                    ranges = self.receivers.ranges.get(b, {})
                    self.sealed_records += sum(r.records for r in ranges.values())
        progress = self.watch_completions()
        k = 0
        last_cut, last_records = 0.0, 1
        while not self.stopping.is_set():
            progress.clear()  # before reading the state: a completion after it wakes us
            with self.lock:
                if self.stops and reached(
                    self.receivers.positions, self.stops, self.receivers.positions
                ):
                    break
                behind = self.behind()
                in_flight = len(self.completion.batches)
                last = self.completion.history[-1] if self.completion.history else None
                took = last.done_at - last.sealed_at if last and last.done_at else 0.0
            delay = pacer.wait(
                k,
                time.time(),
                behind=behind,
                in_flight=in_flight,
                last_cut=last_cut,
                last_records=last_records,
                last_took=took,
            )
            if delay > 0:
                if behind:
                    progress.wait(delay)
                elif self.stopping.wait(delay):
                    return
                continue
            last_cut = time.time()
            b = self.next_batch
            try:
                self.seal_batch(pacer.time_ms(k))
            except Exception:
                if self.stopping.is_set():
                    return  # stopping (e.g. the metadata was lost): already said, once
                log.exception("sealing a batch failed")
            k += 1
            with self.lock:
                last_records = sum(r.records for r in self.receivers.ranges.get(b, {}).values())
                if self.next_batch > b:
                    self.sealed_records += last_records
                    self.sealed_batches += 1
        if not self.stopping.is_set():
            self.finish(progress)

    # -- catch-up and bounded runs (#15) ---------------------------------------------------
    #: a bounded run's stop offset per input partition (empty: unbounded); set by the leader
    stops: dict[tuple[int, int], int] = {}  # noqa: RUF012 (replaced, never mutated)
    #: called once a bounded run's last batch completed: (records, batches, seconds)
    on_finished: Callable[[int, int, float], None] | None = None
    #: a fresh app's table load (:class:`.tables.TableLoader`): called after the first
    #: assignment, it blocks until the tables are loaded; False: stop (set by the leader)
    before_first_cut: Callable[[], bool] | None = None
    #: records and batches this leader sealed (or replayed), for the finished run's summary
    sealed_records = 0
    sealed_batches = 0
    started_at = 0.0

    def watch_completions(self) -> threading.Event:
        """An event set whenever a batch completes (the clock waits on it while behind)."""
        event = threading.Event()

        class _Listener:
            def on_batch_completed(self, _info: BatchInfo, _processing_s: float) -> None:
                event.set()

        with self.lock:
            self.completion.listeners.append(_Listener())
        return event

    def behind(self) -> bool:
        """Whether the input is behind (:func:`.bounded.is_behind`); lock held."""
        last = self.receivers.ranges.get(self.next_batch - 1, {})
        lag = sum(n for w in self.membership.workers.values() for n in w.lag.values())
        return is_behind(
            positions=self.receivers.positions,
            stops=self.stops,
            last=last,
            cap=self.rate_cap() or self.receivers.max_records,
            lag=lag,
        )

    def finish(self, progress: threading.Event) -> None:
        """A bounded run cut its last batch: wait until it completed and is durable, then say so.

        Waits for every batch in flight (recovery included: a lost worker's tasks rerun),
        then for the metadata log to mark the last one done (so a restart would not replay
        it), then calls :attr:`on_finished`.
        """
        last = self.next_batch - 1
        done: int | None = None
        log.info("bounded run: every input partition was read up to its stop offset")
        while not self.stopping.is_set():
            progress.clear()
            with self.lock:
                done = self.completion.done
                if not self.completion.batches and (done is None or done >= last):
                    break
            progress.wait(POLL_S)
        deadline = time.monotonic() + FINISH_DURABLE_WAIT_S
        while not self.stopping.is_set() and done is not None and time.monotonic() < deadline:
            marked = self.metalog.done()
            if marked is not None and marked >= last:
                break
            self.stopping.wait(POLL_S)
        if self.stopping.is_set():
            return
        seconds = time.monotonic() - self.started_at
        if self.on_finished is not None:
            self.on_finished(self.sealed_records, self.sealed_batches, seconds)

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

    def collect_seals(
        self, b: int, workers: list[WorkerInfo], apart: Collection[str] = ()
    ) -> Sealed:
        """Seal batch *b* on every worker at once; the reports of those that answer in time.

        A worker still owing an earlier seal answer is skipped; one that does not answer
        within the seal wait (:meth:`seal_wait_s`) is left out of this batch, its work is
        run elsewhere until it answers (``Scheduler.set_unresponsive``, done by
        :meth:`seal_batch`), and the blocks its late answer reports are freed on their
        holders (they are in no logged range). A worker already set *apart* (a missed
        ping, :mod:`.probes`) is sealed but not waited for: its answer counts if it comes
        while the others answer (at most :data:`APART_GRACE_S` after them).
        """
        seal = wire.Seal(b, self.rate_cap())
        sent: dict[str, Future[Any]] = {}
        for w in workers:
            owed = self.late.get(w.id)
            if owed is not None and not owed.done():
                continue
            self.late.pop(w.id, None)
            sent[w.id] = self.io.submit(w.client.send, seal, SEAL_TIMEOUT_S)
        wait = self.seal_wait_s()
        deadline = time.monotonic() + wait
        futures.wait([f for wid, f in sent.items() if wid not in apart], timeout=wait)
        grace = min(APART_GRACE_S, deadline - time.monotonic())
        if grace > 0:
            futures.wait([f for wid, f in sent.items() if wid in apart], timeout=grace)
        reports: list[wire.BlockReport] = []
        answered: set[str] = set()
        for wid, f in sent.items():
            if not f.done():
                log.warning(
                    "worker %s did not answer the seal of batch %d within %.2f s: batch %d is "
                    "cut without it, its work runs elsewhere, and it is not sealed again "
                    "until it answers",
                    wid,
                    b,
                    wait,
                    b,
                )
                metrics.LATE_SEALS.inc()
                self.late[wid] = f
                f.add_done_callback(functools.partial(self._late_answer, wid))
                continue
            try:
                reports.extend(wire.BlockReport.from_wire(r) for r in f.result())
                answered.add(wid)
            except Exception as e:
                log.warning("seal of batch %d on %s failed: %s", b, wid, e)
        return Sealed(reports, answered)

    def seal_wait_s(self) -> float:
        """How long the clock waits for seal answers before it cuts without a worker."""
        return max(self.interval_s * SEAL_WAIT_FRACTION, SEAL_WAIT_MIN_S)

    def _late_answer(self, wid: str, f: Future[Any]) -> None:
        """A seal answered (or failed) after its batch was cut.

        The worker takes tasks again, its blocks count again, and the blocks its answer
        reports are freed (no logged range names them). A worker that is really gone is
        declared lost by the heartbeat timeout, whatever this finds.
        """
        if f.cancelled() or self.stopping.is_set():
            return
        reports: list[wire.BlockReport] = []
        if f.exception() is None:
            try:
                reports = [wire.BlockReport.from_wire(r) for r in f.result()]
            except Exception as e:  # a malformed answer: nothing to free
                log.debug("a late seal answer could not be read: %s", e)
        with self.lock:
            self.free_unlogged(reports)
            if self._take_back(wid):
                self.dispatcher.dispatch()

    def _take_back(self, wid: str) -> bool:
        """A worker set apart answered a seal: it takes tasks again (lock held).

        False when it was not set apart (nothing to do).
        """
        if wid not in self.scheduler.unresponsive():
            return False
        log.info("worker %s answered its seal: it takes tasks again", wid)
        self.dispatcher.apply(self.scheduler.responsive_again(wid))
        return True

    def free_unlogged(self, reports: Iterable[wire.BlockReport]) -> None:
        """Drop the blocks of seal *reports* that no logged range names (lock held).

        Best effort: a block left behind is only memory (a copy is checked against the
        logged range before use).
        """
        per: dict[str, list[str]] = {}
        for r in reports:
            for h in r.holders:
                per.setdefault(h, []).append(r.block)
        for wid, blocks in per.items():
            w = self.membership.workers.get(wid)
            if w is None:
                continue
            try:
                self.io.submit(quiet_send, w.client, wire.Free(blocks))
            except RuntimeError:  # the I/O pool is shut down: stopping
                return

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
            apart = set(self.scheduler.unresponsive())
        sealed = self.collect_seals(b, workers, apart)
        reports = sealed.reports
        info = BatchInfo(b, time_ms, time.monotonic(), cut_delay=time.time() - time_ms / 1000)
        with self.lock:
            # set apart by a missed ping, but its seal answered in time: it is back
            for wid in sorted(apart & sealed.answered):
                self._take_back(wid)
            # workers that owe a seal answer: their work runs elsewhere until they answer
            for wid, owed in self.late.items():
                if not owed.done() and wid in self.membership:
                    self.dispatcher.apply(self.scheduler.set_unresponsive(wid))
            ok = self.receivers.continuing(reports)
            kept = {id(r) for r in ok}
            self.free_unlogged(r for r in reports if id(r) not in kept)
            reports = ok
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
        # the next batch's tasks, planned in this interval's idle time, outside the lock
        self.scheduler.prepare(b + 1)
