"""Dead letters, committed exactly once per batch by the coordinator.

Workers do not write dead letters: each ``task_done`` carries its attempt's letters
(:class:`ops.protocol.TaskDone`). Tasks are deterministic, so every attempt of a task (a
retry, a speculative copy, a recomputation) yields the same letters; the
:class:`LetterBook` keeps those of the FIRST accepted completion of each task id of a
pending batch, and ignores letters of tasks of batches already completed (lineage
recomputation).

When the batches done advance (in batch order, :meth:`Completion.batch_completed`), the
:class:`DeadLetterCommitter` writes each batch's letters to the dead-letter topic in one
Kafka transaction (``transactional.id = {app}-dead-letters``: a new leader fences an old
one) together with a marker: offset ``batch + 1`` of partition 0 of the dead-letter topic,
committed for the consumer group ``{app}-dead-letters-commits`` with
``send_offsets_to_transaction`` - as the Kafka sink marks its output. Before writing, the
marker is read: a batch below it is already in the topic (an earlier leader wrote it) and
is skipped. The batch is marked done in Redis only after that (the completion's ``persist``
runs after the letters, on the same ordered thread), so a leader that dies in between
leaves the batch to be replayed, which regenerates the same letters.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine.errors import DStreamError, MetadataLostError
from engine.executor import DeadLetter
from ops import metrics
from ops.config import Settings
from ops.sinks import (
    FleetSinks,
    KafkaCallHung,
    _kafka_error,
    dead_letter_reason,
    letter_headers,
    produce,
    transactional_clients,
    txn_call,
)

log = logging.getLogger("dstream.coordinator")

#: First and longest pause between attempts to commit a batch's letters (Kafka away).
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class BatchLetters:
    """The dead letters of one completed batch, in a deterministic order."""

    batch: int
    time_ms: int
    letters: tuple[DeadLetter, ...]


class LetterBook:
    """Dead letters of pending batches: the first accepted completion of each task id.

    Pure bookkeeping (no I/O, no clock); called with the coordinator's lock held.
    """

    def __init__(self) -> None:
        self._batches: dict[int, tuple[int, dict[str, list[DeadLetter]]]] = {}

    def accepted(self, batch: int, time_ms: int, task: str, letters: Iterable[DeadLetter]) -> None:
        """Task *task* of pending *batch* finished for the first time with *letters*.

        A later accepted completion of the same task (a recomputation in the same batch)
        brings the same letters and is ignored.
        """
        got = list(letters)
        if not got:
            return
        _, tasks = self._batches.setdefault(batch, (time_ms, {}))
        tasks.setdefault(task, got)

    def pending(self) -> int:
        """Letters kept, not yet handed over for commit."""
        return sum(len(x) for _, tasks in self._batches.values() for x in tasks.values())

    def take_upto(self, done: int) -> list[BatchLetters]:
        """Hand over the letters of every batch up to *done*, in batch order.

        Letters are ordered by task id, then as the task produced them. A decode letter
        names its source record exactly, so when two tasks of a batch decoded the same
        input block (a source read by two branches), it is kept once.
        """
        out: list[BatchLetters] = []
        for b in sorted(x for x in self._batches if x <= done):
            time_ms, tasks = self._batches.pop(b)
            seen: set[tuple[str, int, int, str]] = set()
            letters: list[DeadLetter] = []
            for task in sorted(tasks):
                for d in tasks[task]:
                    if d.operator.endswith(".decode"):
                        key = (d.topic, d.partition, d.offset, d.operator)
                        if key in seen:
                            continue
                        seen.add(key)
                    letters.append(d)
            out.append(BatchLetters(b, time_ms, tuple(letters)))
        return out


class DeadLetterCommitter:
    """Commits batches' dead letters, in order, on one thread of its own.

    Args:
        settings: Kafka client settings, the dead-letter topic.
        app_id: names the topic (by default), the transactional id and the marker group.
        stopping: set when the coordinator stops (retrying ends).
        may_act: the leader check; a coordinator in doubt commits nothing.
        incarnation: the app's incarnation id, carried by the marker; a marker of another
            incarnation is never taken as "already written" (the app's Redis metadata was
            lost or replaced): *on_lost* is called with the error and nothing is committed.

    While Kafka is away a commit is retried with backoff and everything queued behind it
    (later batches' letters, the batches-done marks) waits: progress is held, never
    skipped.

    """

    def __init__(
        self,
        settings: Settings,
        app_id: str,
        stopping: threading.Event,
        may_act: Callable[[str], bool],
        incarnation: str = "",
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.app_id = app_id
        self.incarnation = incarnation
        self.on_lost = on_lost
        self.topic = settings.dead_letter_topic or f"{app_id}-dead-letters"
        self.transactional_id = f"{app_id}-dead-letters"
        self.group = f"{app_id}-dead-letters-commits"
        self.stopping = stopping
        self.may_act = may_act
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dead-letters")
        self._producer: Any = None
        self._marker: Any = None
        #: the marker as last read or written (batches below it are in the topic)
        self._written: int | None = None
        self.committed_batches = 0
        self.skipped_batches = 0

    def submit(self, batches: list[BatchLetters], then: Callable[[], None]) -> None:
        """Commit *batches* (in order), then run *then* (the batches-done mark)."""
        self._pool.submit(self._run, batches, then)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the ordered thread ----------------------------------------------------------------
    def _run(self, batches: list[BatchLetters], then: Callable[[], None]) -> None:
        for bl in batches:
            if bl.letters and not self._commit_until_done(bl):
                return  # stopping: the next leader replays the batch
        then()

    def _commit_until_done(self, bl: BatchLetters) -> bool:
        delay = RETRY_FIRST_S
        failing = False
        while not self.stopping.is_set():
            try:
                self._commit(bl)
            except MetadataLostError as e:
                log.error("%s", e)
                if self.on_lost is not None:
                    self.on_lost(str(e))
                return False
            except Exception as e:
                failing = True
                log.warning(
                    "committing %d dead letters of batch %d failed (retrying in %.1f s): %s",
                    len(bl.letters),
                    bl.batch,
                    delay,
                    e,
                )
                self._reset()
                self.stopping.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            if failing:
                log.warning("dead letters of batch %d committed after retries", bl.batch)
            return True
        return False

    def _client(self) -> tuple[Any, Any]:
        if self._producer is not None:
            return self._producer, self._marker
        producer, marker = transactional_clients(
            self.settings, self.transactional_id, self.group, "dead letters", topic=self.topic
        )
        self._producer, self._marker = producer, marker
        self._written = None
        return producer, marker

    def _reset(self) -> None:
        """Drop the clients: the next attempt's ``init_transactions`` aborts what is open."""
        from confluent_kafka import KafkaException

        producer, marker = self._producer, self._marker
        self._producer = self._marker = None
        self._written = None
        if producer is not None:
            with contextlib.suppress(KafkaException, KafkaCallHung, RuntimeError):
                txn_call(
                    "abort_transaction",
                    producer.abort_transaction,
                )
        if marker is not None:
            with contextlib.suppress(Exception):
                marker.close()

    def _read_marker(self, marker: Any) -> int:
        """The marker's offset (batches below it are written); checks its incarnation.

        Raises:
            MetadataLostError: the marker belongs to another incarnation of the app.

        """
        from confluent_kafka import TopicPartition

        done, marked = FleetSinks.committed(marker, TopicPartition(self.topic, 0))
        if done is None or done < 0:
            return -1
        if marked != self.incarnation:
            msg = (
                f"app {self.app_id}: the dead-letter commit marker (batch {done - 1}) belongs "
                f"to incarnation {marked or 'unknown'}, not to this run's "
                f"{self.incarnation or 'unknown'}: the app's Redis metadata was lost or "
                f"replaced. Restore Redis from a backup, or run `dstream reset --app-id "
                f"{self.app_id}` to start the app fresh"
            )
            raise MetadataLostError(msg)
        return done

    def _commit(self, bl: BatchLetters) -> None:
        """One transaction: the batch's letters and the marker ``batch + 1`` (or nothing)."""
        from confluent_kafka import KafkaException, TopicPartition

        producer, marker = self._client()
        try:
            if self._written is None:
                self._written = self._read_marker(marker)
            if self._written > bl.batch:
                self.skipped_batches += 1
                log.info("dead letters of batch %d are already committed", bl.batch)
                return
            if not self.may_act("commit dead letters"):
                msg = "not leading: dead letters wait"
                raise DStreamError(msg)
            producer.begin_transaction()
            for d in bl.letters:
                headers = letter_headers(d, bl.time_ms, bl.batch)
                produce(producer, self.topic, d.value, None, headers)
            txn_call(
                "send_offsets_to_transaction",
                producer.send_offsets_to_transaction,
                [TopicPartition(self.topic, 0, bl.batch + 1, metadata=self.incarnation)],
                marker.consumer_group_metadata(),
            )
            if not self.may_act("commit dead letters"):
                msg = "lease in doubt before the dead-letter commit"
                raise DStreamError(msg)
            txn_call(
                "commit_transaction",
                producer.commit_transaction,
            )
        except KafkaException as e:
            where = f"dead letters of batch {bl.batch}"
            raise _kafka_error(where, e) from e
        self._written = bl.batch + 1
        self.committed_batches += 1
        for d in bl.letters:
            metrics.DEAD_LETTERED.labels(reason=dead_letter_reason(d.operator)).inc()
