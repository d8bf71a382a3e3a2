"""Receivers: poll assigned Kafka partitions into the current interval's blocks.

One confluent-kafka consumer per worker serves every partition the coordinator assigned
to it, with ``assign()`` (no consumer-group rebalancing: the coordinator is the authority;
offsets are ours, nothing is committed to Kafka). Records are kept raw (bytes) and decoded
once, by the first task that reads the block. At each batch boundary the coordinator calls
:meth:`Receivers.seal`, which cuts every partition's block at its current position: the
block of batch ``b`` holds exactly the offsets ``[from, until)``.

Backpressure: at most ``max_records`` records per partition per batch (the coordinator may
lower it adaptively); a partition that reaches its cap is paused until the next seal, and
the surplus is re-read later (its position is rewound to ``until``).

Tables: a table partition of a fresh app is assigned with a ``load_until`` (the topic's
end when the app started): its first block reads at least that far, whatever the cap,
and the coordinator cuts the app's first batch only once every such partition got there
(:meth:`Receivers.wait_loaded`, :mod:`ops.coordinator.tables`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from engine.codec import encode_input_block

log = logging.getLogger("dstream.receiver")

#: How long one poll waits for records: short, so seals and shutdowns are prompt.
POLL_TIMEOUT_S = 0.05
#: Records fetched per consume() call: large, to amortise the per-call overhead.
POLL_BATCH = 10_000
#: How often receiver lag is refreshed from the consumer's cached watermarks.
LAG_EVERY_S = 0.5


@dataclass
class _Part:
    """The block being filled for one assigned partition."""

    node: int
    index: int
    topic: str
    partition: int
    start: int  # first offset of the current block
    position: int  # next offset to read (== until of the current block)
    with_meta: bool
    values: list[Any] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    stamps: list[int] = field(default_factory=list)
    paused: bool = False
    #: a bounded run's stop offset (exclusive): nothing at or past it is read
    stop: int | None = None
    #: a table partition's load target (exclusive): the block is not capped below it
    load_until: int | None = None

    @property
    def finished(self) -> bool:
        """A bounded partition read up to its stop offset: no longer fetched."""
        return self.stop is not None and self.position >= self.stop

    @property
    def loading(self) -> bool:
        """A table partition not yet read up to its load target."""
        return self.load_until is not None and self.position < self.load_until


@dataclass(frozen=True)
class Assignment:
    """One partition a worker must read: source node, index in the node's partitions."""

    node: int
    index: int
    topic: str
    partition: int
    start: int
    with_meta: bool = False
    stop: int | None = None
    load_until: int | None = None


@dataclass(frozen=True)
class SealedBlock:
    block_id: str
    topic: str
    partition: int
    start: int
    until: int
    count: int
    data: bytes


class Receivers:
    """All receivers of one worker, over one consumer.

    Args:
        consumer_config: librdkafka settings (bootstrap, pass-through client settings).
        max_records: cap of records per partition per batch (0 = none).

    """

    def __init__(self, consumer_config: dict[str, Any], max_records: int = 0) -> None:
        self._config = dict(consumer_config)
        self._config.setdefault("enable.auto.commit", False)
        self._config.setdefault("enable.auto.offset.store", False)
        self._config.setdefault("enable.partition.eof", False)
        self._config.setdefault("isolation.level", "read_committed")
        self._config.setdefault("fetch.wait.max.ms", 20)
        self._config.setdefault("queued.max.messages.kbytes", 65536)
        self.max_records = max_records
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, int], _Part] = {}
        self._consumer: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reassign = threading.Event()
        self.received = 0
        self.errors: list[str] = []
        #: log-end offset minus next offset to read, per (topic, partition)
        self.lag: dict[tuple[str, int], int] = {}
        self._lag_at = 0.0

    # -- control ---------------------------------------------------------------------------
    def assign(self, assignments: list[Assignment]) -> None:
        """Read exactly these partitions from now on; kept ones continue where they are."""
        with self._lock:
            new: dict[tuple[str, int], _Part] = {}
            for a in assignments:
                key = (a.topic, a.partition)
                old = self._parts.get(key)
                if old is not None and old.node == a.node and old.start == a.start:
                    new[key] = old  # same block in progress: keep what it already read
                else:
                    new[key] = _Part(
                        a.node, a.index, a.topic, a.partition, a.start, a.start, a.with_meta
                    )
                new[key].stop = a.stop
                new[key].load_until = a.load_until
            self._parts = new
            self._reassign.set()
        if self._thread is None and new:
            self._thread = threading.Thread(target=self._run, name="receiver", daemon=True)
            self._thread.start()

    def positions(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return {k: p.position for k, p in self._parts.items()}

    def loads(self) -> list[tuple[str, int, int, int]]:
        """``(topic, partition, position, load_until)`` of every partition with a load target."""
        with self._lock:
            return [
                (p.topic, p.partition, p.position, p.load_until)
                for p in self._parts.values()
                if p.load_until is not None
            ]

    def wait_loaded(self, timeout: float) -> list[tuple[str, int, int, int]]:
        """Wait up to *timeout* s until no partition is below its load target; :meth:`loads`.

        Returns as soon as every table partition is loaded (or at once without any), so the
        coordinator, which asks again until they all are, hears of it within a poll.
        """
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                loading = any(p.loading for p in self._parts.values())
            if not loading or time.monotonic() >= end or self._stop.is_set():
                return self.loads()
            time.sleep(POLL_TIMEOUT_S)

    def seal(self, b: int) -> list[SealedBlock]:
        """Cut every assigned partition's block for batch *b* (``[start, position)``).

        A table partition's load target applies to the first block only: it is forgotten
        here. Cutting one below its target means the coordinator did not wait for it
        (logged: that batch's joins see part of the table).
        """
        with self._lock:
            sealed: list[SealedBlock] = []
            resume = []
            for p in self._parts.values():
                if p.loading:
                    log.warning(
                        "table partition %s[%d] cut at offset %d before its load target %d",
                        p.topic,
                        p.partition,
                        p.position,
                        p.load_until,
                    )
                p.load_until = None
                data = encode_input_block(
                    p.topic,
                    p.partition,
                    p.start,
                    p.position,
                    p.values,
                    p.offsets,
                    p.keys if p.with_meta else None,
                    p.stamps if p.with_meta else None,
                )
                sealed.append(
                    SealedBlock(
                        f"in/{p.node}/{b}/{p.index}",
                        p.topic,
                        p.partition,
                        p.start,
                        p.position,
                        len(p.values),
                        data,
                    )
                )
                p.start = p.position
                p.values, p.offsets, p.keys, p.stamps = [], [], [], []
                if p.paused:
                    p.paused = False
                    resume.append(p)
            if resume:
                self._reassign.set()
        return sealed

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- polling ---------------------------------------------------------------------------
    def _apply_assignment(self) -> None:
        from confluent_kafka import TopicPartition

        with self._lock:
            self._reassign.clear()
            tps = [
                TopicPartition(p.topic, p.partition, p.position)
                for p in self._parts.values()
                if not p.paused and not p.finished
            ]
        self._consumer.assign(tps)

    def _run(self) -> None:
        from confluent_kafka import Consumer

        self._consumer = Consumer(self._config)
        try:
            while not self._stop.is_set():
                if self._reassign.is_set():
                    self._apply_assignment()
                if not self._parts:
                    time.sleep(POLL_TIMEOUT_S)
                    continue
                msgs = self._consumer.consume(POLL_BATCH, POLL_TIMEOUT_S)
                if msgs:
                    self._append(msgs)
                now = time.monotonic()
                if now - self._lag_at > LAG_EVERY_S:
                    self._lag_at = now
                    self._update_lag()
                    self._skip_to_stops()
                self._skip_to_loads()
        except Exception as e:  # a receiver must never die silently
            log.exception("receiver stopped: %s", e)
            self.errors.append(str(e))
        finally:
            self._consumer.close()

    def _update_lag(self) -> None:
        """Lag per partition from the high watermarks the consumer already fetched."""
        from confluent_kafka import TopicPartition

        with self._lock:
            parts = [(p.topic, p.partition, p.position) for p in self._parts.values()]
        lag: dict[tuple[str, int], int] = {}
        for topic, partition, position in parts:
            try:
                _lo, hi = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True
                )
            except Exception as e:
                log.debug("watermarks of %s[%d]: %s", topic, partition, e)
                continue
            if hi is not None and hi >= 0:
                lag[(topic, partition)] = max(0, hi - position)
        self.lag = lag

    def _skip_to_stops(self) -> None:
        """Bounded partitions whose consumer passed their stop offset: finished.

        The last offsets before a stop may be transaction markers, which are never
        delivered; the consumer's position moves past them. Runs on the polling thread,
        right after every delivered record was appended (a pending reassignment means
        records were dropped: then nothing is skipped).
        """
        with self._lock:
            open_ = [
                p
                for p in self._parts.values()
                if p.stop is not None and not p.paused and not p.finished
            ]
            for p, offset in self._positions(open_):
                stop = p.stop
                if stop is not None and offset >= stop:
                    p.position = stop
                    self._reassign.set()

    def _skip_to_loads(self) -> None:
        """Table partitions whose consumer passed their load target: loaded.

        As :meth:`_skip_to_stops`: the offsets before the target may be transaction
        markers or aborted records, never delivered. On the polling thread, right after
        every delivered record was appended.
        """
        with self._lock:
            open_ = [p for p in self._parts.values() if p.loading and not p.paused]
            for p, offset in self._positions(open_):
                until = p.load_until
                if until is not None and offset >= until:
                    p.position = until

    def _positions(self, parts: list[_Part]) -> list[tuple[_Part, int]]:
        """The consumer's position of each of *parts* (lock held).

        None while a reassignment is pending (records were dropped) or when Kafka cannot say.
        """
        from confluent_kafka import TopicPartition

        if not parts or self._reassign.is_set():
            return []
        try:
            got = self._consumer.position([TopicPartition(p.topic, p.partition) for p in parts])
        except Exception as e:
            log.debug("positions: %s", e)
            return []
        return [(p, tp.offset) for p, tp in zip(parts, got, strict=True) if tp.offset is not None]

    def _append(self, msgs: list[Any]) -> None:
        cap = self.max_records
        with self._lock:
            if self._reassign.is_set():
                return  # positions changed under us: drop, re-read from the new positions
            parts = self._parts
            for m in msgs:
                err = m.error()
                if err is not None:
                    if not err.retriable() and err.code() != -191:  # -191: partition EOF
                        self.errors.append(str(err))
                        log.warning("kafka error: %s", err)
                    continue
                p = parts.get((m.topic(), m.partition()))
                off = m.offset()
                if p is None or p.paused or off < p.position:
                    continue
                if p.stop is not None and off >= p.stop:
                    # a bounded run: the block ends exactly at the stop offset
                    p.position = max(p.position, p.stop)
                    self._reassign.set()  # stop fetching this partition
                    continue
                p.values.append(m.value())
                p.offsets.append(off)
                if p.with_meta:
                    p.keys.append(m.key())
                    p.stamps.append(m.timestamp()[1])
                p.position = off + 1
                self.received += 1
                if cap and len(p.values) >= cap and not p.loading:
                    p.paused = True
                    self._reassign.set()
