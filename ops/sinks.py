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

Output records are encoded one by one before the commit is asked for
(:func:`encode_records`): one that cannot be encoded is a dead letter, not a failed task.
Workers do not write dead letters: they bound them (:func:`bound_letter`) and report them
with ``task_done``; the coordinator commits them once per batch
(:mod:`ops.coordinator.dead_letters`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from engine.codec import pack
from engine.errors import DStreamError, FencedError, MetadataLostError, UserFunctionError
from engine.executor import DeadLetter
from engine.graph import Node
from engine.plan import TaskSpec
from engine.sinks import SinkEnv, run_engine_sink
from ops import faults
from ops.config import Settings
from state.metalog import fence_error

log = logging.getLogger("dstream.sinks")

#: librdkafka transaction timeout: long enough for a slow batch, short enough that a dead
#: producer's open transaction is aborted by the broker soon after.
TXN_TIMEOUT_MS = 20_000
#: Bound on Kafka client calls (init/commit/committed) before the task fails and is retried.
KAFKA_CALL_TIMEOUT_S = 10.0
#: Past its own timeout plus this grace a call is taken as hung (see :func:`bounded_call`).
HUNG_GRACE_S = 5.0
#: how long a new transactional producer waits for its first broker connection before it
#: asks for a producer id (:func:`transactional_clients`)
KAFKA_CONNECT_WAIT_S = 2.0
#: how long a new transactional producer's first ``init_transactions`` waits before it is
#: checked for a refusal by a transaction still open (:func:`transactional_clients`)
INIT_PROBE_S = 0.05


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


def txn_call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """A transactional producer call bounded by :data:`KAFKA_CALL_TIMEOUT_S`.

    The bound is passed as the call's own timeout and to :func:`bounded_call`.
    """
    return bounded_call(what, fn, *args, KAFKA_CALL_TIMEOUT_S, timeout=KAFKA_CALL_TIMEOUT_S)


def produce(producer: Any, topic: str, value: bytes, key: bytes | None, headers: Any) -> None:
    """``producer.produce``, serving delivery callbacks while its local queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers)
            return
        except BufferError:
            producer.poll(0.05)


def _json(x: Any) -> bytes:
    return json.dumps(x, separators=(",", ":"), default=_default).encode()


def _default(x: Any) -> Any:
    """JSON of what :mod:`json` does not know: bytes as text, sets as sorted lists.

    A set (or frozenset) is written as a list sorted by value when its members compare
    (``{3, 1, 2}`` -> ``[1,2,3]``), else by their ``repr`` - deterministic either way, so a
    re-run writes identical bytes. Anything else raises :class:`TypeError` (the record is
    then an encode dead letter).
    """
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if isinstance(x, set | frozenset):
        try:
            return sorted(x)
        except TypeError:
            return sorted(x, key=repr)
    msg = f"cannot encode {type(x).__name__} as JSON"
    raise TypeError(msg)


def encode_output(record: Any, fmt: str) -> tuple[bytes | None, bytes]:
    """Message key and value of an output record: ``(key, value)`` pairs split, others whole."""
    enc: Callable[[Any], bytes] = pack if fmt == "msgpack" else _json
    if isinstance(record, tuple | list) and len(record) == 2:
        return enc(record[0]), enc(record[1])
    return None, enc(record)


class Encoded(tuple[bytes | None, bytes]):
    """An output record already encoded as a Kafka ``(key, value)`` (see :func:`encode_records`)."""

    __slots__ = ()


#: Bytes a Kafka record needs beyond its key and value (record and batch framing, the
#: ``dstream-batch`` headers), when checking it against the producer's ``message.max.bytes``.
RECORD_OVERHEAD_BYTES = 512
#: librdkafka's default ``message.max.bytes``.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
#: How much of an oversize value a truncated dead letter keeps.
TRUNCATED_PREFIX_BYTES = 1024


def _letter_value(record: Any) -> bytes:
    if isinstance(record, bytes):
        return record
    try:
        return json.dumps(record, default=repr).encode()
    except (TypeError, ValueError):
        return repr(record).encode()


def encode_records(
    node: Node,
    spec: TaskSpec,
    records: list[Any],
    max_message_bytes: int,
    fail: bool = False,
) -> tuple[list[Any], list[DeadLetter]]:
    """Encode an output task's records one by one, before its commit is asked for.

    Called on the output task path (worker) with the records the executor produced. A
    record that cannot be encoded (``TypeError``/``ValueError``/``OverflowError``, e.g. a
    ``complex`` as JSON) or whose encoded Kafka record would exceed
    *max_message_bytes* becomes a dead letter of operator ``<node>.encode`` (coordinates:
    the output topic or node, the output partition, offset -1) and is left out; the rest
    commits. Kafka records come back as :class:`Encoded` (the commit does not encode them
    again); Redis records come back as they were, once their value is known to encode.
    Engine-side sinks (``foreach_batch``, ``pprint``) take records as they are.

    With *fail* (``fail_on_error``) the first such record raises
    :class:`UserFunctionError` instead, which stops the app.

    Deterministic: the same records give the same output and the same dead letters.
    """
    sink = getattr(node, "args", {}).get("sink")
    if sink not in ("kafka", "redis"):
        return records, []
    where = node.args["topic"] if sink == "kafka" else node.name
    operator = f"{node.name}.encode"
    out: list[Any] = []
    dead: list[DeadLetter] = []
    fmt = node.args.get("format", "json")
    for r in records:
        try:
            if sink == "kafka":
                k, v = encode_output(r, fmt)
                size = len(k or b"") + len(v) + RECORD_OVERHEAD_BYTES
                if size > max_message_bytes:
                    msg = (
                        f"encoded record of {size} bytes exceeds the producer's "
                        f"message.max.bytes {max_message_bytes}"
                    )
                    raise ValueError(msg)
                out.append(Encoded((k, v)))
            else:
                v = r[1] if isinstance(r, tuple | list) and len(r) == 2 else r
                _json(v)
                out.append(r)
        except (TypeError, ValueError, OverflowError) as e:
            coords = f"output {where} partition {spec.part} batch {spec.batch}"
            if fail:
                raise UserFunctionError(operator, e, r, coords) from e
            dead.append(
                DeadLetter(
                    where, spec.part, -1, operator, f"{type(e).__name__}: {e}", _letter_value(r)
                )
            )
    return out, dead


def bound_letter(d: DeadLetter, max_bytes: int) -> DeadLetter:
    """*d*, or its truncated form when its value exceeds *max_bytes*.

    The truncated letter keeps the value's first :data:`TRUNCATED_PREFIX_BYTES` bytes and
    its original size (headers ``dstream-truncated``, ``dstream-size``).

    Called on the worker before letters cross the RPC, so no dead letter can be refused by
    the broker (MSG_SIZE_TOO_LARGE) and no oversize value travels to the coordinator.
    """
    if len(d.value) <= max_bytes:
        return d
    return DeadLetter(
        d.topic,
        d.partition,
        d.offset,
        d.operator,
        d.error,
        d.value[:TRUNCATED_PREFIX_BYTES],
        len(d.value),
    )


def letter_headers(d: DeadLetter, batch_ms: int, batch: int) -> list[tuple[str, bytes]]:
    """The headers of a dead-letter record (source coordinates, operator, error, batch)."""
    headers = [
        ("dstream-source-topic", d.topic.encode()),
        ("dstream-source-partition", str(d.partition).encode()),
        ("dstream-source-offset", str(d.offset).encode()),
        ("dstream-operator", d.operator.encode()),
        ("dstream-error", d.error.encode()[:1000]),
        ("dstream-batch", str(batch_ms).encode()),
        ("dstream-batch-seq", str(batch).encode()),
    ]
    if d.original_size:
        headers += [
            ("dstream-truncated", b"true"),
            ("dstream-size", str(d.original_size).encode()),
        ]
    return headers


def dead_letter_reason(operator: str) -> str:
    """The ``reason`` label of a dead letter: ``decode``, ``encode`` or ``user``."""
    if operator.endswith(".decode"):
        return "decode"
    if operator.endswith(".encode"):
        return "encode"
    return "user"


_REDIS_COMMIT = """
-- KEYS[1] epoch key, KEYS[2] marker hash; ARGV: epoch, partition, batch, mode, hash, n, k/v...
-- a missing epoch is lost metadata (FLUSHALL, an empty replica), never epoch 0
local raw = redis.call('GET', KEYS[1])
if not raw then return redis.error_reply('METADATA_LOST ' .. KEYS[1] .. ' is missing') end
local cur = tonumber(raw)
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


def transactional_clients(
    settings: Settings, tid: str, group: str, where: str, topic: str | None = None
) -> tuple[Any, Any]:
    """A transactional producer (``init_transactions`` done) and its marker consumer.

    The producer's ``init_transactions`` fences any earlier producer of *tid* and resolves
    its open transaction; the consumer of *group* reads the marker (the committed offset
    the transactions advance). Used by the Kafka sink and the dead-letter committer.

    Both ask Kafka for the least they can before the first commit, since an output
    partition that moves (a lost, paused or slow worker) waits for them:

    * the producer asks for a producer id only once it is connected to a broker by its
      id. librdkafka answers the first metadata request from the bootstrap connection,
      then drops it and connects to the brokers it named, but only after about 50 ms;
      ``init_transactions`` asked in between finds no broker and waits out a 500 ms
      retry timer. So *topic*'s metadata is fetched until a named broker answers (the
      first answer came from the bootstrap connection in about a third of the tries).
      ``bench/txn_takeover.py`` measures taking over a transactional id from a live idle
      producer up to the first commit, against the local broker: with one metadata fetch
      first, 7 of 16 tries took 0.5-0.6 s (p50 0.12 s); fetching until a named broker
      answers, p50 0.09 s and at most 0.12 s over 16 tries;
    * an earlier owner that stopped mid-commit (paused or killed between
      ``begin_transaction`` and its commit) left its transaction open: the broker starts
      aborting it at the first ``init_transactions`` and answers
      ``CONCURRENT_TRANSACTIONS``, and librdkafka asks again only after the same 500 ms.
      The first ask waits :data:`INIT_PROBE_S`; refused so, that producer is closed and a
      fresh one asks again once connected (by then the abort is done). Taking over from
      an owner stopped mid-transaction took 0.62 s at p50 and up to 1.07 s; now p50
      0.17 s and at most 0.23 s (the same benchmark, 16 tries);
    * the marker consumer is made first, so it finds its group coordinator meanwhile.

    Raises:
        FencedError | DStreamError: starting the producer failed (*where* names it).

    """
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

    marker = Consumer(
        settings.kafka_client_config(
            **{
                "group.id": group,
                "enable.auto.commit": False,
                # the marker is read after init_transactions resolved any earlier
                # transaction of this id, and a commit of this very producer is known
                # locally (its offset may not be readable yet right after the commit): do
                # not ask for "stable" offsets (after a broker restart that wait can time out)
                "isolation.level": "read_uncommitted",
            }
        )
    )
    config = settings.kafka_client_config(
        **{
            "transactional.id": tid,
            "transaction.timeout.ms": TXN_TIMEOUT_MS,
            "linger.ms": 5,
            "enable.idempotence": True,
        }
    )

    def connected() -> Any:
        producer = Producer(config)
        # connect to a broker by its id before asking for a producer id (see above); a
        # failure here shows again, with its cause, in init_transactions
        connect_by_id(producer, topic, KAFKA_CONNECT_WAIT_S)
        return producer

    try:
        producer = connected()
        ready, refused = True, False
        try:
            bounded_call(
                "init_transactions", producer.init_transactions, INIT_PROBE_S, timeout=INIT_PROBE_S
            )
        except KafkaException as e:
            err = e.args[0] if e.args else None
            if err is None or not err.retriable():
                raise
            ready, refused = False, err.code() == KafkaError.CONCURRENT_TRANSACTIONS
        if refused:
            # the broker is aborting a transaction the earlier owner left open (see
            # above): a fresh producer asks again once connected. This one is closed
            # first, before its retry timer fires (it would fence the fresh one); its
            # close finds the init in progress and says so in a warning
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                with contextlib.suppress(Exception):
                    producer.close()
            producer = connected()
        if not ready:  # refused, or slow (the same call resumes where it was)
            txn_call(
                "init_transactions",
                producer.init_transactions,
            )
    except BaseException as e:
        with contextlib.suppress(Exception):
            marker.close()
        if isinstance(e, KafkaException):
            what = f"{where}: starting the transactional producer"
            raise _kafka_error(what, e) from e
        raise
    return producer, marker


def connect_by_id(client: Any, topic: str | None, wait_s: float) -> bool:
    """Fetch *topic*'s metadata until a broker named by its id answers (*wait_s* at most).

    The first answer of a new client often comes from its bootstrap connection
    (``orig_broker_id`` -1), which librdkafka then drops: a request that needs a broker
    (a producer id) made before the named broker's connection is up waits out a retry
    timer. True once a named broker answered; False when none did in time, or a fetch
    failed (the caller's next request reports why).
    """
    from confluent_kafka import KafkaException

    end = time.monotonic() + wait_s
    while (left := end - time.monotonic()) > 0:
        try:
            md = client.list_topics(topic, timeout=left)
        except KafkaException:
            return False
        if md.orig_broker_id >= 0:
            return True
        time.sleep(min(0.01, max(0.0, end - time.monotonic())))
    return False


class FleetSinks(SinkEnv):
    """Kafka, Redis and engine-side sinks of one worker process."""

    def __init__(
        self,
        settings: Settings,
        app_id: str,
        epoch_fn: Any = None,
        incarnation_fn: Callable[[], str] | None = None,
    ) -> None:
        self.settings = settings
        self.app_id = app_id
        self._epoch_fn = epoch_fn or (lambda: 0)
        #: the app's incarnation id (from the leader's registration reply): Kafka commit
        #: markers carry it, and a marker of another incarnation is lost metadata
        self._incarnation_fn = incarnation_fn or (lambda: "")
        self._lock = threading.Lock()
        self._producers: dict[tuple[int, int], tuple[Any, Any]] = {}
        #: the last batch this process committed per (incarnation, node, partition): right
        #: after a commit the marker's new offset may not be readable yet (the broker
        #: writes the transaction's markers after it answers), so a retry of the same
        #: batch here must not trust a stale marker
        self._committed_here: dict[tuple[str, int, int], int] = {}
        self._redis: Any = None
        self._redis_script: Any = None
        self.committed_batches = 0
        self._kafka_ok = True
        self.skipped_batches = 0

    # -- kafka -----------------------------------------------------------------------------
    def _producer(self, node: Node, part: int) -> tuple[Any, Any]:
        key = (node.id, part)
        with self._lock:
            got = self._producers.get(key)
            if got is not None:
                return got
        tid = f"{self.app_id}-{node.id}-{part}"
        where = f"{node.name} partition {part}"
        producer, marker = transactional_clients(
            self.settings, tid, f"{tid}-commits", where, topic=node.args["topic"]
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
            incarnation = self._incarnation_fn()
            done, marked = self.committed(marker, tp)
            if done is not None and done >= 0 and marked != incarnation:
                # another run's marker (its Redis metadata was lost, or this one's): never
                # "already written", never overwritten; the coordinator stops the app
                msg = (
                    f"app {self.app_id}: the commit marker of {node.name} partition "
                    f"{spec.part} (batch {done - 1}) belongs to incarnation {marked or 'unknown'}"
                    f", not to this run's {incarnation or 'unknown'}: the app's Redis metadata "
                    f"was lost or replaced. Restore Redis from a backup, or run `dstream reset "
                    f"--app-id {self.app_id}` to start the app fresh"
                )
                raise MetadataLostError(msg)
            here = (incarnation, node.id, spec.part)
            if (done is not None and done > spec.batch) or self._committed_here.get(
                here, -1
            ) >= spec.batch:
                self.skipped_batches += 1
                return  # this batch (or a later one) is already in Kafka
            producer.begin_transaction()
            headers = [
                ("dstream-batch", str(batch_ms).encode()),
                ("dstream-batch-seq", str(spec.batch).encode()),
            ]
            fmt = node.args["format"]
            for r in records:
                k, v = r if isinstance(r, Encoded) else encode_output(r, fmt)
                produce(producer, topic, v, k, headers)
            txn_call(
                "send_offsets_to_transaction",
                producer.send_offsets_to_transaction,
                [TopicPartition(topic, 0, spec.batch + 1, metadata=incarnation)],
                marker.consumer_group_metadata(),
            )
            if guard is not None and not guard():
                txn_call(
                    "abort_transaction",
                    producer.abort_transaction,
                )
                msg = f"{node.name} partition {spec.part}: lease lost before commit"
                raise FencedError(msg)
            txn_call(
                "commit_transaction",
                producer.commit_transaction,
            )
            with self._lock:
                self._committed_here[here] = max(self._committed_here.get(here, -1), spec.batch)
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
                    txn_call(
                        "abort_transaction",
                        producer.abort_transaction,
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
    def committed(marker: Any, tp: Any) -> tuple[int | None, str]:
        """The marker group's committed offset and its metadata (the incarnation id).

        The offset is negative when no marker was committed. Transient coordinator errors
        are retried, including a group coordinator that moved or is still loading (which
        librdkafka does not flag retriable; a fresh broker answers so while it creates
        ``__consumer_offsets``).
        """
        from confluent_kafka import KafkaError, KafkaException

        moving = (
            KafkaError.NOT_COORDINATOR,
            KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
            KafkaError.COORDINATOR_NOT_AVAILABLE,
        )
        for attempt in range(6):
            try:
                got = bounded_call("committed", marker.committed, [tp], 5.0, timeout=5.0)
                return got[0].offset, got[0].metadata or ""
            except KafkaException as e:
                err = e.args[0] if e.args else None
                transient = err is not None and (err.retriable() or err.code() in moving)
                if not transient or attempt == 5:
                    raise
                time.sleep(0.1 * (attempt + 1))
        return None, ""

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
            if "METADATA_LOST" in str(e):
                raise fence_error(e) from e  # MetadataLostError, with what to do
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

    def close(self) -> None:
        with self._lock:
            items = list(self._producers.values())
            self._producers.clear()
        for producer, marker in items:
            producer.flush(5)
            marker.close()
