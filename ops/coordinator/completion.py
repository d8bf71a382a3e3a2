"""Completion and lineage bookkeeping: batches in flight, done, checkpoints in force.

:class:`Completion` follows every batch from its seal to its completion (the timings
status and the metrics report), tells its listeners (the rate controller) of each
completed batch, and moves the durable progress forward: the highest batch done, the
checkpoints that took effect (a checkpoint counts once its batch is done), and the
lineage that may be forgotten. Called with the coordinator's lock held; the Redis
writes it starts (:meth:`persist`) run after the dead letters of the batches done are
committed, on the dead-letter committer's ordered thread
(:mod:`ops.coordinator.dead_letters`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.executor import DeadLetter
from engine.scheduler import Scheduler
from ops import metrics
from ops.coordinator.dead_letters import DeadLetterCommitter, LetterBook
from ops.coordinator.durable import DurableWriter
from ops.protocol import Checkpointed
from state.metalog import MetaLog, OffsetRange

log = logging.getLogger("dstream.coordinator")

#: Offset ranges are kept this many batches past what lineage needs (audits, tests).
KEEP_RANGES_BATCHES = 1000
#: Completed batches kept for status.
HISTORY = 200


@dataclass
class BatchInfo:
    """One batch from its seal to its completion (monotonic times)."""

    batch: int
    time_ms: int
    sealed_at: float
    records: int = 0
    #: seconds from the batch time to its seal answers collected (wall clock)
    cut_delay: float = 0.0
    first_task: float | None = None
    done_at: float | None = None
    ranges: dict[str, OffsetRange] = field(default_factory=dict)


class CompletionListener(Protocol):
    def on_batch_completed(self, info: BatchInfo, processing_s: float) -> None: ...


class CheckpointStore(Protocol):
    def delete_before(self, node: int, part: int, batch: int) -> Any: ...


class Completion:
    """Batches in flight and the progress that is made durable.

    Args:
        scheduler: asked for the batch up to which everything completed; told of the
            checkpoints that took effect.
        metalog: where progress is written (``mark_done``, ``set_checkpoint``,
            ``forget_before``), under *epoch*.
        checkpoints: old checkpoints are deleted from it once a newer one is in force.
        durable: retries the writes while Redis is away.
        io: runs :meth:`persist` off the lock.
        prune: forgets in-memory lineage before a batch (the receiver tracker's).
        max_keep: the longest lineage a window or state needs, in batches.
        done: the highest batch done when this leader took over (None: none yet).

    """

    def __init__(
        self,
        scheduler: Scheduler,
        metalog: MetaLog,
        checkpoints: CheckpointStore,
        durable: DurableWriter,
        io: Executor,
        prune: Callable[[int], None],
        max_keep: int,
        epoch: int,
        done: int | None,
    ) -> None:
        self.scheduler = scheduler
        self.metalog = metalog
        self.checkpoints = checkpoints
        self.durable = durable
        self.io = io
        self.prune = prune
        self.max_keep = max_keep
        self.epoch = epoch
        self.done = done
        self.batches: dict[int, BatchInfo] = {}
        self.history: list[BatchInfo] = []
        self.pending_ckpts: list[tuple[int, int, int]] = []
        #: (time a loss was detected, batch that must complete for recovery to be over)
        self.recovering: tuple[float, int] | None = None
        self.listeners: list[CompletionListener] = []
        #: dead letters of pending batches (first accepted completion of each task)
        self.letters = LetterBook()
        #: commits batches' dead letters, then runs :meth:`persist`, in order; None: no
        #: dead-letter topic (unit tests), :meth:`persist` runs on the I/O pool
        self.dead_letters: DeadLetterCommitter | None = None

    def started(self, info: BatchInfo) -> None:
        """Batch ``info.batch`` was sealed (or is replayed) and handed to the scheduler."""
        self.batches[info.batch] = info

    def task_launched(self, b: int, now: float) -> int | None:
        """A task of batch *b* is launched; its batch time (ms), if the batch is known."""
        info = self.batches.get(b)
        if info is None:
            return None
        if info.first_task is None:
            info.first_task = now
            metrics.SCHEDULING_DELAY.observe(now - info.sealed_at)
        return info.time_ms

    def worker_lost(self, now: float, next_batch: int) -> None:
        """Recovery starts (once): it is over when *next_batch* completes."""
        if self.recovering is None:
            self.recovering = (now, next_batch)

    def task_letters(self, b: int, task: str, letters: list[DeadLetter]) -> None:
        """Task *task* of batch *b* finished for the first time with dead *letters*.

        Kept while *b* is pending; letters of a batch already completed (a lineage
        recomputation) were committed with it, or will be, and are ignored.
        """
        info = self.batches.get(b)
        if info is not None and letters:
            self.letters.accepted(b, info.time_ms, task, letters)

    def checkpointed(self, msg: Checkpointed) -> None:
        """A worker wrote a checkpoint; it takes effect once its batch is done."""
        self.pending_ckpts.append((msg.node, msg.part, msg.batch))

    def batch_completed(self, b: int, now: float) -> None:
        """The scheduler completed batch *b*: record timings, advance durable progress."""
        info = self.batches.pop(b, None)
        if info is not None:
            info.done_at = now
            start = info.first_task or now
            metrics.PROCESSING_TIME.observe(now - start)
            metrics.TOTAL_DELAY.observe(now - info.sealed_at)
            self.history.append(info)
            del self.history[:-HISTORY]
            for listener in self.listeners:
                listener.on_batch_completed(info, now - start)
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
            keep_from = min(oldest, done) - self.max_keep - KEEP_RANGES_BATCHES
            self.prune(keep_from)
            if self.dead_letters is None:
                self.io.submit(self.persist, done, ready, keep_from)
            else:
                # batch order: the letters of every batch up to *done* are committed
                # before *done* is marked (a leader dying in between replays the batches)
                self.dead_letters.submit(
                    self.letters.take_upto(done),
                    functools.partial(self.persist, done, ready, keep_from),
                )

    def persist(self, b: int, ckpts: list[tuple[int, int, int]], keep_from: int) -> None:
        """Persist progress: checkpoints in force, batches done, lineage still needed.

        One metadata write (:meth:`state.metalog.MetaLog.complete`: one Redis round trip
        whatever the number of pointers), then the checkpoints the new pointers replace
        are deleted.
        """
        try:
            self.durable.write("batch done", self.metalog.complete, self.epoch, b, ckpts, keep_from)
            for node, part, cb in ckpts:
                self.checkpoints.delete_before(node, part, cb)
        except Exception as e:
            log.warning("marking batch %d done failed: %s", b, e)

    def history_status(self) -> list[dict[str, Any]]:
        return [
            {
                "batch": i.batch,
                "time_ms": i.time_ms,
                "records": i.records,
                "cut_delay": i.cut_delay,
                "scheduling_delay": (i.first_task - i.sealed_at) if i.first_task else None,
                "processing_time": (i.done_at - i.first_task)
                if i.done_at and i.first_task
                else None,
                "total_delay": (i.done_at - i.sealed_at) if i.done_at else None,
            }
            for i in self.history[-50:]
        ]
