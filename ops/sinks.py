"""The fleet's sinks: exactly-once Kafka and Redis outputs, and the dead-letter topic.

An output task commits only after the coordinator granted it the commit right of its
(batch, output partition), and the coordinator grants them in batch order per partition.

* Kafka: one transactional producer per output partition (``transactional.id =
  {app}-{node}-{part}``; a new owner's ``init_transactions`` fences any zombie). The
  transaction also commits the batch number as the offset of a marker consumer group, so
  "was batch b already written?" is answered by Kafka itself, atomically with the data: a
  retry after a crash between the Kafka commit and the coordinator hearing of it writes
  nothing twice.
* Redis: a Lua script writes the batch's keys and the partition's marker together, and
  only when the batch is newer than the marker and the caller's epoch is current.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.codec import pack
from engine.errors import DStreamError, FencedError
from engine.executor import DeadLetter
from engine.graph import Node
from engine.plan import TaskSpec
from engine.sinks import SinkEnv, run_engine_sink
from ops import faults
from ops.config import Settings

log = logging.getLogger("dstream.sinks")

#: librdkafka transaction timeout: long enough for a slow batch, short enough that a dead
#: producer's open transaction is aborted by the broker soon after.
TXN_TIMEOUT_MS = 20_000
#: Bound on Kafka client calls (init/commit/committed) before the task fails and is retried.
KAFKA_CALL_TIMEOUT_S = 10.0
#: Past its own timeout plus this grace a call is taken as hung (see :func:`bounded_call`).
HUNG_GRACE_S = 5.0


class KafkaCallHung(DStreamError):
    """A Kafka client call did not return, even past its own timeout."""


def _kafka_error(where: str, e: Exception) -> DStreamError:
    """A failed Kafka call as the error a task reports.

    :class:`FencedError` when a newer producer of the transactional id took over (a retry is
    safe and expected), else :class:`DStreamError` (retried with backoff).
    """
    err = e.args[0] if e.args else None
    if err is not None and "fenced" in str(err).lower():
        return FencedError(f"{where}: {err}")
    return DStreamError(f"{where}: {e}")


def bounded_call(what: str, fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
    """Run a blocking Kafka client call, giving up on it ``HUNG_GRACE_S`` past *timeout*.

    librdkafka's transactional calls take a timeout, but after a broker restart
    ``send_offsets_to_transaction`` can block past it indefinitely (it waits for the group
    coordinator's broker state to change; librdkafka issues #5456 and #5511). The call runs
    on a daemon thread; when it overruns, :class:`KafkaCallHung` is raised and the caller
    abandons the client (a new transactional producer of the same id fences and aborts
    whatever the hung one had open).
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the caller below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name=f"kafka-{what}", daemon=True).start()
    if not done.wait(timeout + HUNG_GRACE_S):
        msg = f"Kafka {what} did not return within {timeout + HUNG_GRACE_S:.0f} s"
        raise KafkaCallHung(msg)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _json(x: Any) -> bytes:
    return json.dumps(x, separators=(",", ":"), default=_default).encode()


def _default(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if isinstance(x, set | frozenset):
        return sorted(x, key=repr)
    msg = f"cannot encode {type(x).__name__} as JSON"
    raise TypeError(msg)


def encode_output(record: Any, fmt: str) -> tuple[bytes | None, bytes]:
    """Message key and value of an output record: ``(key, value)`` pairs split, others whole."""
    enc: Callable[[Any], bytes] = pack if fmt == "msgpack" else _json
    if isinstance(record, tuple | list) and len(record) == 2:
        return enc(record[0]), enc(record[1])
    return None, enc(record)


_REDIS_COMMIT = """
-- KEYS[1] epoch key, KEYS[2] marker hash; ARGV: epoch, partition, batch, mode, hash, n, k/v...
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < cur then return redis.error_reply('FENCED epoch ' .. ARGV[1]) end
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '-1')
if tonumber(ARGV[3]) <= last then return 0 end
local n = tonumber(ARGV[6])
for i = 0, n - 1 do
  local k = ARGV[7 + 2 * i]
  local v = ARGV[8 + 2 * i]
  if ARGV[4] == 'hash' then
    if v == 'null' then redis.call('HDEL', ARGV[5], k) else redis.call('HSET', ARGV[5], k, v) end
  else
    if v == 'null' then redis.call('DEL', k) else redis.call('SET', k, v) end
  end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


class FleetSinks(SinkEnv):
    """Kafka, Redis and engine-side sinks of one worker process."""

    def __init__(self, settings: Settings, app_id: str, epoch_fn: Any = None) -> None:
        self.settings = settings
        self.app_id = app_id
        self._epoch_fn = epoch_fn or (lambda: 0)
        self._lock = threading.Lock()
        self._producers: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._redis: Any = None
        self._redis_script: Any = None
        self._dlq: Any = None
        self.committed_batches = 0
        self._kafka_ok = True
        self.skipped_batches = 0
        self.dead_lettered = 0

    # -- kafka -----------------------------------------------------------------------------
    def _producer(self, node: Node, part: int) -> tuple[Any, Any]:
        from confluent_kafka import Consumer, KafkaException, Producer

        key = (node.id, part)
        with self._lock:
            got = self._producers.get(key)
            if got is not None:
                return got
        tid = f"{self.app_id}-{node.id}-{part}"
        producer = Producer(
            self.settings.kafka_client_config(
                **{
                    "transactional.id": tid,
                    "transaction.timeout.ms": TXN_TIMEOUT_MS,
                    "linger.ms": 5,
                    "enable.idempotence": True,
                }
            )
        )
        try:
            bounded_call(
                "init_transactions",
                producer.init_transactions,
                KAFKA_CALL_TIMEOUT_S,
                timeout=KAFKA_CALL_TIMEOUT_S,
            )
        except KafkaException as e:
            where = f"{node.name} partition {part}: starting the transactional producer"
            raise _kafka_error(where, e) from e
        marker = Consumer(
            self.settings.kafka_client_config(
                **{
                    "group.id": f"{tid}-commits",
                    "enable.auto.commit": False,
                    # the marker is read only after init_transactions resolved any earlier
                    # transaction of this id, so no commit can be pending: do not ask for
                    # "stable" offsets (after a broker restart that wait can time out)
                    "isolation.level": "read_uncommitted",
                }
            )
        )
        with self._lock:
            self._producers[key] = (producer, marker)
        return producer, marker

    def _kafka_commit(
        self,
        node: Node,
        spec: TaskSpec,
        batch_ms: int,
        records: list[Any],
        guard: Callable[[], bool] | None = None,
    ) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        topic = node.args["topic"]
        producer, marker = self._producer(node, spec.part)
        tp = TopicPartition(topic, 0)
        try:
            done = self._committed(marker, tp)
            if done is not None and done > spec.batch:
                self.skipped_batches += 1
                return  # this batch (or a later one) is already in Kafka
            producer.begin_transaction()
            headers = [
                ("dstream-batch", str(batch_ms).encode()),
                ("dstream-batch-seq", str(spec.batch).encode()),
            ]
            fmt = node.args["format"]
            for r in records:
                k, v = encode_output(r, fmt)
                while True:
                    try:
                        producer.produce(topic, value=v, key=k, headers=headers)
                        break
                    except BufferError:
                        producer.poll(0.05)
            bounded_call(
                "send_offsets_to_transaction",
                producer.send_offsets_to_transaction,
                [TopicPartition(topic, 0, spec.batch + 1)],
                marker.consumer_group_metadata(),
                KAFKA_CALL_TIMEOUT_S,
                timeout=KAFKA_CALL_TIMEOUT_S,
            )
            if guard is not None and not guard():
                bounded_call(
                    "abort_transaction",
                    producer.abort_transaction,
                    KAFKA_CALL_TIMEOUT_S,
                    timeout=KAFKA_CALL_TIMEOUT_S,
                )
                msg = f"{node.name} partition {spec.part}: lease lost before commit"
                raise FencedError(msg)
            bounded_call(
                "commit_transaction",
                producer.commit_transaction,
                KAFKA_CALL_TIMEOUT_S,
                timeout=KAFKA_CALL_TIMEOUT_S,
            )
            faults.crash_point("after_kafka_commit")
            self.committed_batches += 1
            self._kafka_state(ok=True)
        except (KafkaCallHung, KafkaException) as e:
            # whatever went wrong (fenced, broker restarted mid-transaction, a hung call),
            # the next attempt starts from a fresh producer: its init_transactions aborts
            # anything this one left open, so no half-written batch can linger. A hung
            # client is abandoned untouched (closing it could block too).
            hung = isinstance(e, KafkaCallHung)
            err = None if hung else (e.args[0] if e.args else None)
            if hung or (err is not None and err.retriable()):
                self._kafka_state(ok=False, why=str(e if hung else err))
            if err is not None and err.txn_requires_abort():
                with contextlib.suppress(KafkaException, KafkaCallHung):
                    bounded_call(
                        "abort_transaction",
                        producer.abort_transaction,
                        KAFKA_CALL_TIMEOUT_S,
                        timeout=KAFKA_CALL_TIMEOUT_S,
                    )
            with self._lock:
                self._producers.pop((node.id, spec.part), None)
            if not hung:
                with contextlib.suppress(Exception):
                    marker.close()
            where = f"{node.name} partition {spec.part}: Kafka commit of batch {spec.batch}"
            raise _kafka_error(where, e) from e

    def _kafka_commit_fresh_on_fence(
        self,
        node: Node,
        spec: TaskSpec,
        batch_ms: int,
        records: list[Any],
        guard: Callable[[], bool] | None,
    ) -> None:
        """:meth:`_kafka_commit`, once more with a fresh producer if the cached one was fenced.

        Output partitions move between workers (speculation, a new leader), so a producer
        cached here may have been fenced since by the same transactional id elsewhere. The
        commit right is this attempt's, so a fresh producer (whose ``init_transactions``
        fences the other) commits it at once instead of failing the task; the marker check
        skips a batch already written.
        """
        cached = (node.id, spec.part) in self._producers
        try:
            self._kafka_commit(node, spec, batch_ms, records, guard)
        except FencedError as e:
            if not cached or (guard is not None and not guard()):
                raise
            log.info("%s; retrying with a fresh producer", e)
            self._kafka_commit(node, spec, batch_ms, records, guard)

    @staticmethod
    def _committed(marker: Any, tp: Any) -> int | None:
        """The marker group's committed offset, retrying transient coordinator errors."""
        from confluent_kafka import KafkaException

        for attempt in range(6):
            try:
                got = bounded_call("committed", marker.committed, [tp], 5.0, timeout=5.0)
                return got[0].offset  # type: ignore[no-any-return]
            except KafkaException as e:
                err = e.args[0] if e.args else None
                if err is None or not err.retriable() or attempt == 5:
                    raise
                time.sleep(0.1 * (attempt + 1))
        return None

    def _kafka_state(self, ok: bool, why: str = "") -> None:
        """Say once per change whether Kafka is reachable (log line and metric)."""
        from ops.metrics import DEGRADED

        if ok == self._kafka_ok:
            return
        self._kafka_ok = ok
        DEGRADED.labels(dependency="kafka").set(0 if ok else 1)
        if ok:
            log.warning("kafka available again")
        else:
            log.warning("kafka unavailable (%s): output tasks retry with backoff", why)

    # -- redis -----------------------------------------------------------------------------
    def _redis_commit(
        self,
        node: Node,
        spec: TaskSpec,
        records: list[Any],
        guard: Callable[[], bool] | None = None,
    ) -> None:
        import redis

        if self._redis is None:
            from ops.services import redis_client

            self._redis = redis_client(self.settings)
            self._redis_script = self._redis.register_script(_REDIS_COMMIT)
        prefix = f"dstream:{self.app_id}:"
        mode = node.args["mode"]
        args: list[Any] = [
            self._epoch_fn(),
            spec.part,
            spec.batch,
            mode,
            prefix + node.args["hash_name"] if mode == "hash" else "",
            len(records),
        ]
        for r in records:
            k, v = (r[0], r[1]) if isinstance(r, tuple | list) and len(r) == 2 else (r, r)
            name = str(k) if mode == "hash" else prefix + node.args["key_pattern"].format(key=k)
            args += [name, _json(v)]
        faults.crash_point("before_redis_commit")
        if guard is not None and not guard():
            msg = f"{node.name} partition {spec.part}: lease lost before commit"
            raise FencedError(msg)
        try:
            res = self._redis_script(keys=[prefix + "epoch", f"{prefix}out:{node.id}"], args=args)
        except redis.ResponseError as e:
            if "FENCED" in str(e):
                raise FencedError(str(e)) from e
            raise
        if res:
            self.committed_batches += 1
        else:
            self.skipped_batches += 1

    # -- SinkEnv ---------------------------------------------------------------------------
    def commit(
        self,
        node: Node,
        spec: TaskSpec,
        batch_time_ms: int,
        records: list[Any],
        guard: Callable[[], bool] | None = None,
    ) -> None:
        sink = node.args["sink"]
        if sink == "kafka":
            self._kafka_commit_fresh_on_fence(node, spec, batch_time_ms, records, guard)
        elif sink == "redis":
            self._redis_commit(node, spec, records, guard)
        else:
            run_engine_sink(node, batch_time_ms, records)

    def dead_letters(self, letters: list[DeadLetter]) -> None:
        """Send dead letters to the dead-letter topic (at least once), or log them."""
        from ops.metrics import DEAD_LETTERED

        for d in letters:
            DEAD_LETTERED.labels(
                reason="decode" if d.operator.endswith(".decode") else "user"
            ).inc()
        self.dead_lettered += len(letters)
        topic = self.settings.dead_letter_topic or f"{self.app_id}-dead-letters"
        from confluent_kafka import Producer

        if self._dlq is None:
            self._dlq = Producer(self.settings.kafka_client_config(**{"linger.ms": 20}))
        for d in letters:
            headers = [
                ("dstream-source-topic", d.topic.encode()),
                ("dstream-source-partition", str(d.partition).encode()),
                ("dstream-source-offset", str(d.offset).encode()),
                ("dstream-operator", d.operator.encode()),
                ("dstream-error", d.error.encode()[:1000]),
            ]
            self._dlq.produce(topic, value=d.value, headers=headers)
        self._dlq.flush(KAFKA_CALL_TIMEOUT_S)

    def close(self) -> None:
        with self._lock:
            items = list(self._producers.values())
            self._producers.clear()
        for producer, marker in items:
            producer.flush(5)
            marker.close()
        if self._dlq is not None:
            self._dlq.flush(5)
