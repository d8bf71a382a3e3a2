"""The leader: the roles of a coordinator that holds the lease, wired together.

A :class:`Leader` is built when a coordinator takes the lease (:meth:`Leader.load` reads
the metadata log, then the constructor only wires): the scheduler, membership, receiver
tracking, the batch clock, dispatch, completion, rate control and status, plus the
method -> handler table of the calls workers make to a leader. It runs the loops of a
leader (the batch clock, the loss monitor, the liveness probes, the speculation pump)
until the coordinator stops.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from engine.plan import Plan
from engine.scheduler import SPECULATION_EVERY_S, Scheduler
from ops import protocol as wire
from ops.config import Settings
from ops.coordinator.batch_clock import BatchClock
from ops.coordinator.completion import CheckpointStore, Completion
from ops.coordinator.dead_letters import DeadLetterCommitter
from ops.coordinator.dispatch import Dispatcher
from ops.coordinator.durable import DurableWriter
from ops.coordinator.membership import Membership, WorkerClient
from ops.coordinator.probes import Prober
from ops.coordinator.queries import StateQueries
from ops.coordinator.rate_control import RateController
from ops.coordinator.receivers import (
    Key,
    Layout,
    ReceiverTracker,
    positions_after,
    start_positions,
)
from ops.coordinator.status import LeaderStatus
from state.metalog import MetaLog, OffsetRange

log = logging.getLogger("dstream.coordinator")


@dataclass(frozen=True)
class Resume:
    """Where a new leader resumes, as the metadata log says."""

    epoch: int
    first: int
    done: int | None
    ranges: dict[int, dict[str, OffsetRange]]
    times: dict[int, int]
    checkpoints: dict[tuple[int, int], int]
    #: the app's incarnation id (the Kafka sink's commit markers carry it)
    incarnation: str = ""

    @property
    def next_batch(self) -> int:
        return max(
            [
                self.first,
                (self.done + 1) if self.done is not None else self.first,
                *(b + 1 for b in self.ranges),
            ]
        )

    @property
    def replay(self) -> list[int]:
        """Batches logged by an earlier leader but not complete: run again."""
        return sorted(b for b in self.ranges if self.done is None or b > self.done)


class Leader:
    """The roles of the leading coordinator.

    Args:
        settings: the fleet's settings (interval, speculation, rate, heartbeats).
        plan: the compiled graph; *layout* the input partitions of every source.
        resume: what the metadata log says (:meth:`load`).
        positions: next offset per input partition (:func:`.receivers.start_positions`).
        connect: the client of a worker, by address, carrying *resume.epoch*.
        may_act: the lease check (:meth:`ops.coordinator.leadership.LeaderElection.may_act`).
        fail_app: called with the error when a user function failed under fail_on_error.
        metadata_lost: called with the error when a worker found the app's metadata lost
            (fatal: the coordinator exits, see :class:`engine.errors.MetadataLostError`).
        The others are shared with the coordinator (lock, stop event, I/O pool, Redis).

    """

    def __init__(
        self,
        *,
        settings: Settings,
        app_id: str,
        holder: str,
        plan: Plan,
        layout: Layout,
        interval_ms: int,
        expect_workers: int,
        resume: Resume,
        positions: dict[Key, int],
        metalog: MetaLog,
        checkpoints: CheckpointStore,
        durable: DurableWriter,
        connect: Callable[[str], WorkerClient],
        io: Executor,
        lock: threading.RLock,
        stopping: threading.Event,
        may_act: Callable[[str], bool],
        fail_app: Callable[[str], None],
        http_port: Callable[[], int | None] = lambda: None,
        metadata_lost: Callable[[str], None] | None = None,
    ) -> None:
        s = settings
        self.settings = settings
        self.layout = layout
        self.interval_ms = interval_ms
        self.resume = resume
        self.lock = lock
        self.stopping = stopping
        self.may_act = may_act
        self.fail_app = fail_app
        self.metadata_lost = metadata_lost or fail_app
        self.scheduler = Scheduler(
            plan,
            resume.first,
            speculation=s.speculation,
            multiplier=s.speculation_multiplier,
            quantile=s.speculation_quantile,
            # inputs since the last checkpoint stay (both copies): lost state is rebuilt
            # from them in parallel; a stalled checkpoint writer bounds the retention
            retain_inputs=2 * s.checkpoint_every_batches + 2,
        )
        for (node, part), b in resume.checkpoints.items():
            self.scheduler.set_checkpoint(node, part, b)
        self.receivers = ReceiverTracker(
            layout, positions, resume.ranges, resume.times, s.max_records_per_partition or None
        )
        self.membership = Membership(self.scheduler, connect)
        self.completion = Completion(
            self.scheduler,
            metalog,
            checkpoints,
            durable,
            io,
            self.receivers.prune,
            max(plan.keep.values(), default=0),
            resume.epoch,
            resume.done,
        )
        self.rate = RateController(s.batch_interval, len(positions), s.max_records_per_partition)
        if s.adaptive_rate:
            self.completion.listeners.append(self.rate)
        self.completion.dead_letters = DeadLetterCommitter(
            s,
            app_id,
            stopping,
            may_act,
            incarnation=resume.incarnation,
            on_lost=self.metadata_lost,
        )
        self.dispatcher = Dispatcher(
            self.scheduler,
            self.membership,
            self.receivers,
            self.completion,
            io,
            lock,
            may_act,
            s.task_retry_alert_seconds,
        )
        replay = resume.replay
        self.clock = BatchClock(
            interval_s=s.batch_interval,
            expect_workers=expect_workers,
            next_batch=resume.next_batch,
            replay=replay,
            fresh=resume.done is None and not replay,
            scheduler=self.scheduler,
            membership=self.membership,
            receivers=self.receivers,
            completion=self.completion,
            dispatcher=self.dispatcher,
            metalog=metalog,
            durable=durable,
            epoch=resume.epoch,
            io=io,
            lock=lock,
            stopping=stopping,
            may_act=may_act,
            rate_cap=lambda: self.rate.cap,
        )
        #: pings the workers of long-running tasks (a paused worker is set apart at once)
        self.prober = Prober(
            interval_s=s.batch_interval,
            scheduler=self.scheduler,
            membership=self.membership,
            dispatcher=self.dispatcher,
            lock=lock,
            stopping=stopping,
            may_act=may_act,
        )
        self.status = LeaderStatus(
            app_id=app_id,
            holder=holder,
            epoch=resume.epoch,
            first=resume.first,
            interval_ms=interval_ms,
            scheduler=self.scheduler,
            membership=self.membership,
            receivers=self.receivers,
            completion=self.completion,
            next_batch=lambda: self.clock.next_batch,
            rate_cap=lambda: self.rate.cap,
            http_port=http_port,
        )
        #: answers ``dstream query`` and ``GET /api/state/...`` (named streams' state)
        self.queries = StateQueries(
            app_id=app_id,
            scheduler=self.scheduler,
            membership=self.membership,
            checkpoints=checkpoints,  # type: ignore[arg-type]  # the store reads them too
            times=self.receivers.times.get,
            lock=lock,
            first=resume.first,
            interval_ms=interval_ms,
        )
        #: the method -> handler table of the calls workers (and tools) make to the leader
        self.handlers: wire.Handlers = {
            "register": lambda p: self.register(wire.Register.from_wire(p)).to_wire(),
            "heartbeat": lambda p: self.heartbeat(wire.Heartbeat.from_wire(p)).value,
            "task_done": lambda p: self.dispatcher.task_done(wire.TaskDone.from_wire(p)),
            "task_failed": lambda p: self.task_failed(wire.TaskFailed.from_wire(p)),
            "request_commit": lambda p: (
                self.dispatcher.request_commit(wire.RequestCommit.from_wire(p)).value
            ),
            "checkpointed": lambda p: self.checkpointed(wire.Checkpointed.from_wire(p)),
            "query": lambda p: self.queries.answer(wire.Query.from_wire(p)),
        }

    @staticmethod
    def load(metalog: MetaLog, epoch: int) -> Resume:
        """Read where to resume from the metadata log (the only I/O of taking over)."""
        logged = metalog.logged()
        ranges = {b: lb.ranges for b, lb in logged.items()}
        times = {b: lb.time_ms for b, lb in logged.items()}
        return Resume(
            epoch,
            metalog.first_batch(0),
            metalog.done(),
            ranges,
            times,
            metalog.checkpoints(),
            metalog.incarnation() or "",
        )

    @staticmethod
    def positions(
        layout: Layout,
        resume: Resume,
        first_offsets: Callable[[list[tuple[int, int, str, int]]], dict[Key, int]],
    ) -> dict[Key, int]:
        """Next offset per input partition: after the log, else the source's start."""
        return start_positions(layout, positions_after(resume.ranges), first_offsets)

    def start(self) -> None:
        """Start the leader's threads: clock, loss monitor, liveness probes, speculation."""
        threading.Thread(target=self.clock.run, name="batch-clock", daemon=True).start()
        threading.Thread(target=self.monitor, name="monitor", daemon=True).start()
        threading.Thread(target=self.prober.run, name="probe", daemon=True).start()
        if self.settings.speculation:
            threading.Thread(target=self.pump, name="speculation", daemon=True).start()

    # -- handlers --------------------------------------------------------------------------
    def register(self, msg: wire.Register) -> wire.RegisterReply:
        """A worker joins (or rejoins after it lost touch: its partitions are sent again)."""
        with self.lock:
            self.membership.register(msg, time.monotonic())
            self.receivers.dirty = True
        return wire.RegisterReply(
            self.resume.epoch,
            self.resume.first,
            dict(self.layout),
            self.interval_ms,
            self.resume.incarnation,
        )

    def heartbeat(self, msg: wire.Heartbeat) -> wire.HeartbeatAnswer:
        with self.lock:
            return self.membership.heartbeat(msg, time.monotonic())

    def task_failed(self, msg: wire.TaskFailed) -> bool:
        """Retry a failed task; a user function failure under fail_on_error fails the app.

        Lost metadata (:attr:`~ops.protocol.FailureKind.METADATA_LOST`) stops the
        coordinator.
        """
        if msg.kind is wire.FailureKind.APP_FAILED:
            log.error("app failed: task %s: %s", msg.task, msg.error)
            self.fail_app(msg.error)
            return True
        if msg.kind is wire.FailureKind.METADATA_LOST:
            # not retried: the worker's commit found the metadata gone or another run's
            self.metadata_lost(f"task {msg.task}: {msg.error}")
            return True
        return self.dispatcher.task_failed(msg)

    def checkpointed(self, msg: wire.Checkpointed) -> bool:
        with self.lock:
            self.completion.checkpointed(msg)
        return True

    # -- loops -----------------------------------------------------------------------------
    def pump(self) -> None:
        """Tick the scheduler while tasks run (speculation).

        A straggler is then noticed when it crosses its threshold, not only when some other
        event happens to come.
        """
        while not self.stopping.wait(SPECULATION_EVERY_S):
            if not self.may_act("speculate"):
                continue
            with self.lock, self._survive("speculating"):
                if self.scheduler.batches and self.scheduler.running_count():
                    self.dispatcher.dispatch()

    def monitor(self) -> None:
        """Declare workers lost after ``heartbeat_misses`` silent heartbeat intervals."""
        iv = self.settings.heartbeat_interval
        limit = iv * self.settings.heartbeat_misses
        deaf = False
        while not self.stopping.wait(iv / 2):
            if not self.may_act("declare workers lost"):
                deaf = True  # workers were refused (or unheard) meanwhile
                continue
            with self.lock, self._survive("declaring workers lost"):
                if deaf:
                    # this coordinator's lease lapsed (Redis slow or away, a pause), not the
                    # workers: their silence counts from now (their reports are retried and
                    # their commits refused while they were not heard)
                    deaf = False
                    self.membership.heard_all(time.monotonic())
                for wid in self.membership.silent(time.monotonic(), limit):
                    self.lose_worker(wid)

    @contextlib.contextmanager
    def _survive(self, doing: str) -> Iterator[None]:
        """Keep a loop thread alive through one failed round: log it, unless stopping.

        A loop that died would wedge the app (no worker ever declared lost); while stopping,
        the I/O pool is already shut down and refuses new calls, which is expected.
        """
        try:
            yield
        except Exception:
            if not self.stopping.is_set():
                log.exception("%s failed", doing)

    def lose_worker(self, wid: str) -> None:
        """Rerun the tasks and reassign the partitions of a lost worker (lock held)."""
        instructions = self.membership.lose(wid)
        if instructions is None:
            return
        self.dispatcher.apply(instructions)
        self.receivers.dirty = True
        self.completion.worker_lost(time.monotonic(), self.clock.next_batch)
        self.dispatcher.dispatch()

    def close(self) -> None:
        """Close the clients of every worker (the workers keep running)."""
        with self.lock:
            workers = list(self.membership.workers.values())
        for w in workers:
            w.client.close()
        self.queries.close()
        self.prober.close()
        if self.completion.dead_letters is not None:
            self.completion.dead_letters.close()


def status_of(leader: Leader) -> dict[str, Any]:
    """The leader's status (with the lock held)."""
    with leader.lock:
        return leader.status.build()
