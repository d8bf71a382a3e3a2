"""The Kafka producer harness behind ``dstream produce``: page-view events at a held rate.

The harness has three layers, each testable on its own:

* :func:`pageview_events` is the event source: a pure, seeded generator of page-view
  events (``url``, ``user``, ``ts``, ``seq``) with uniform or Zipf-skewed keys.
* :class:`Pacer` and :func:`run_paced` are the rate control: a schedule (record *i* is due
  at ``start + i / rate``) served in small time slices, with an injectable clock and
  sleep so that unit tests run on a fake clock.
* :func:`produce_pageviews` is the thin I/O shell: it wires the source and the pacer to a
  confluent-kafka ``Producer`` tuned for throughput and returns a :class:`ProduceResult`.
  Its hot loop (:func:`_pageview_emitter`) draws the very stream :func:`pageview_events`
  yields, without a dict or a generator step per event, and fills a bytes template for
  JSON; ``procs > 1`` splits the urls (and so the rate) across child processes.

Bootstrap resolution (:func:`resolve_bootstrap`): the explicit value, else
``DSTREAM_KAFKA_BOOTSTRAP``, else the local dev services' discovered address, else
``127.0.0.1:19092``. Extra librdkafka settings come from ``DSTREAM_KAFKA_CONFIG``.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import msgpack

from engine.errors import ConfigError, ServiceError

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "KeyDist",
    "PacedRun",
    "Pacer",
    "ProduceResult",
    "ValueFormat",
    "encode_event",
    "ensure_topic",
    "kafka_extra_config",
    "pageview_events",
    "produce_pageviews",
    "resolve_bootstrap",
    "run_paced",
    "validate_args",
    "zipf_cumulative_weights",
]

KeyDist = Literal["uniform", "zipf"]
ValueFormat = Literal["json", "msgpack"]

#: Last-resort bootstrap: the port the local dev services (``dstream dev up``) use.
DEFAULT_BOOTSTRAP = "127.0.0.1:19092"

#: Pacing slice: records due within one slice are sent together. 5 ms keeps the send
#: granularity far below the shortest batch interval (10 ms) while one slice at 20,000
#: records/s is a batch of 100, so per-wake-up overhead is amortised.
SLICE_S = 0.005

#: Largest backlog (in seconds of schedule) the pacer catches up after a stall (a GC pause,
#: a full producer queue). Beyond it the schedule is shifted instead, so a stall never
#: turns into a burst of more than one second of records.
MAX_LAG_S = 1.0

#: Records emitted per loop iteration when the rate is 0 (as fast as possible): large
#: enough to amortise the loop, small enough to keep polling and the deadline responsive.
UNPACED_CHUNK = 2_000

#: Longest single sleep of the pacing loop, so progress, polling and the deadline stay
#: responsive at very low rates.
MAX_SLEEP_S = 0.1

#: A rated ``--duration`` run stops after its last scheduled record, or this long after the
#: deadline if it fell behind, so a slow broker never stretches the run much past it.
DEADLINE_GRACE_S = 0.1

#: How long the final flush waits for outstanding deliveries; records still queued after it
#: are counted as errors. 30 s covers librdkafka retries against a briefly slow broker.
FLUSH_TIMEOUT_S = 30.0

#: How long start-up waits for broker metadata before reporting Kafka as unreachable.
METADATA_TIMEOUT_S = 10.0

#: Most events one emit call walks: a paced run that fell behind gets its backlog in pieces,
#: so polling, progress and the per-second counts keep up (at ~1 us a record, ~5 ms each).
MAX_EMIT = 5_000

#: A page view as JSON, filled with ``%`` (url number, user number, ts, seq): byte-identical
#: to :func:`encode_event`'s compact ``json.dumps`` and ten times cheaper.
_JSON_TEMPLATE = b'{"url":"/page/%d","user":"u%d","ts":%d,"seq":%d}'

#: Distinct users page views are attributed to.
DEFAULT_USERS = 10_000

#: Seconds between progress lines (about twice a second).
PROGRESS_EVERY_S = 0.5


# --------------------------------------------------------------------------- validation


def validate_args(
    *,
    rate: float,
    count: int | None,
    duration: float | None,
    keys: int,
    key_dist: str,
    zipf_s: float,
    fmt: str,
    partitions: int | None = None,
    procs: int = 1,
) -> None:
    """Check the harness arguments before anything connects to Kafka.

    Raises:
        ConfigError: a value is out of range or both ``count`` and ``duration`` are missing;
            the message names the argument, the offending value and what to pass instead.

    """
    if count is None and duration is None:
        msg = "give --count N or --duration SECONDS: the harness needs to know when to stop"
        raise ConfigError(msg)
    if not math.isfinite(rate) or rate < 0:
        msg = f"rate must be >= 0 records/s (0 means as fast as possible), got {rate}"
        raise ConfigError(msg)
    if count is not None and count < 1:
        msg = f"count must be at least 1 record, got {count}"
        raise ConfigError(msg)
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        msg = f"duration must be a positive number of seconds, got {duration}"
        raise ConfigError(msg)
    if keys < 1:
        msg = f"keys must be at least 1, got {keys}"
        raise ConfigError(msg)
    if key_dist not in ("uniform", "zipf"):
        msg = f"key distribution must be 'uniform' or 'zipf', got {key_dist!r}"
        raise ConfigError(msg)
    if not (math.isfinite(zipf_s) and zipf_s > 0):
        msg = f"zipf skew must be a positive number (e.g. 1.1), got {zipf_s}"
        raise ConfigError(msg)
    if fmt not in ("json", "msgpack"):
        msg = f"value format must be 'json' or 'msgpack', got {fmt!r}"
        raise ConfigError(msg)
    if partitions is not None and partitions < 1:
        msg = f"partitions must be at least 1, got {partitions}"
        raise ConfigError(msg)
    if procs < 1 or procs > keys:
        msg = f"procs must be between 1 and keys ({keys}): each owns some urls, got {procs}"
        raise ConfigError(msg)


# --------------------------------------------------------------------------- events


def zipf_cumulative_weights(keys: int, s: float) -> list[float]:
    """Cumulative Zipf weights: entry *k* is ``sum(1 / (j + 1) ** s for j <= k)``.

    Key *k* (0-based) has rank ``k + 1``, so ``/page/0`` is the most frequent page. Draw a
    key with ``bisect(cum, rng.random() * cum[-1])``.
    """
    cum: list[float] = []
    total = 0.0
    for k in range(keys):
        total += 1.0 / (k + 1) ** s
        cum.append(total)
    return cum


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def pageview_events(
    n: int | None,
    keys: int,
    dist: KeyDist | str = "uniform",
    seed: int = 0,
    *,
    zipf_s: float = 1.1,
    users: int = DEFAULT_USERS,
    clock_ms: Callable[[], int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Generate page-view events: ``{"url": "/page/<k>", "user": "u<i>", "ts": ms, "seq": s}``.

    Args:
        n: Number of events, or ``None`` for an endless stream.
        keys: Number of distinct pages (keys ``/page/0`` to ``/page/<keys - 1>``).
        dist: ``"uniform"`` or ``"zipf"`` (rank-``k`` page has weight ``1 / k ** zipf_s``).
        seed: Seed of the private :class:`random.Random`; the same seed gives the same urls,
            users and sequence numbers, in the same order.
        zipf_s: Zipf skew exponent (larger is more skewed).
        users: Number of distinct users.
        clock_ms: Event-time source, called once per event when it is yielded. ``None`` means
            wall-clock milliseconds; pass a fake for fully deterministic output.

    Yields:
        One fresh dict per event. ``seq`` counts the events of that url, from 0 and without
        gaps, so a consumer can check per-key order and completeness.

    Raises:
        ConfigError: ``keys``, ``users``, ``dist`` or ``zipf_s`` is invalid.

    """
    if keys < 1 or users < 1:
        msg = f"keys and users must be at least 1, got keys={keys} users={users}"
        raise ConfigError(msg)
    if dist not in ("uniform", "zipf"):
        msg = f"key distribution must be 'uniform' or 'zipf', got {dist!r}"
        raise ConfigError(msg)
    if dist == "zipf" and not (math.isfinite(zipf_s) and zipf_s > 0):
        msg = f"zipf skew must be a positive number (e.g. 1.1), got {zipf_s}"
        raise ConfigError(msg)
    return _pageview_events(n, keys, dist, seed, zipf_s, users, clock_ms or _wall_clock_ms)


def _pageview_events(
    n: int | None,
    keys: int,
    dist: str,
    seed: int,
    zipf_s: float,
    users: int,
    clock_ms: Callable[[], int],
) -> Iterator[dict[str, Any]]:
    # Arguments are validated eagerly by pageview_events; this is the lazy body.
    rng = random.Random(seed)  # noqa: S311 - load generation, not cryptography
    urls = [f"/page/{k}" for k in range(keys)]
    seqs = [0] * keys
    rand = rng.random
    randrange = rng.randrange
    if dist == "zipf":
        cum = zipf_cumulative_weights(keys, zipf_s)
        total = cum[-1]
        last = keys - 1

        def pick() -> int:
            return min(bisect.bisect_right(cum, rand() * total), last)

    else:

        def pick() -> int:
            return randrange(keys)

    i = 0
    while n is None or i < n:
        k = pick()
        seq = seqs[k]
        seqs[k] = seq + 1
        yield {"url": urls[k], "user": f"u{randrange(users)}", "ts": clock_ms(), "seq": seq}
        i += 1


def encode_event(event: dict[str, Any], fmt: ValueFormat | str) -> bytes:
    """Serialize one event as the value bytes of its Kafka message (compact JSON or msgpack)."""
    if fmt == "msgpack":
        out: bytes = msgpack.packb(event, use_bin_type=True)
        return out
    return json.dumps(event, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- pacing


@dataclass
class Pacer:
    """Schedule-based pacing: record *i* (0-based) is due at ``start + i / rate``.

    The pacer never sleeps; it answers two questions for a loop that owns the clock:
    how many records may go now (:meth:`take`) and when to wake up next
    (:meth:`next_wake`). Records due within one slice are sent together, which holds the
    long-run rate exactly while keeping wake-ups to about ``1 / slice_s`` per second.
    A backlog larger than ``max_lag_s`` of schedule is forgiven by shifting ``start``.

    Attributes:
        rate: Target records per second; ``0`` means unpaced (as fast as possible).
        start: Clock time of record 0.
        slice_s: Minimum time between wake-ups when records are due continuously.
        max_lag_s: Largest backlog, in seconds of schedule, that is caught up.
        chunk: Records allowed per call when unpaced.

    """

    rate: float
    start: float
    slice_s: float = SLICE_S
    max_lag_s: float = MAX_LAG_S
    chunk: int = UNPACED_CHUNK

    def due(self, now: float) -> int:
        """Cumulative number of records due by *now* (record 0 is due at ``start``)."""
        if self.rate <= 0:
            return sys.maxsize
        elapsed = now - self.start
        if elapsed < 0:
            return 0
        # The epsilon absorbs float error in start (shifted by take) so that a record due
        # exactly now counts as due.
        return int(elapsed * self.rate + 1e-9) + 1

    def take(self, now: float, sent: int) -> int:
        """Records to send at *now*, given *sent* already sent; never negative.

        If the backlog exceeds ``max_lag_s`` seconds of schedule, ``start`` moves forward so
        that exactly that much backlog remains (the rest of the schedule is forgiven).
        """
        if self.rate <= 0:
            return self.chunk
        backlog = self.due(now) - sent
        cap = max(1, int(self.rate * self.max_lag_s))
        if backlog > cap:
            self.start += (backlog - cap) / self.rate
            backlog = cap
        return max(0, backlog)

    def next_wake(self, woke: float, sent: int) -> float:
        """Clock time of the next wake-up for a loop that woke at *woke* and has sent *sent*.

        It is the later of the next record's due time and ``woke + slice_s``; unpaced, it
        is *woke* itself (no sleep).
        """
        if self.rate <= 0:
            return woke
        return max(self.start + sent / self.rate, woke + self.slice_s)


@dataclass
class PacedRun:
    """What :func:`run_paced` did: records emitted, elapsed clock time, per-second counts.

    Attributes:
        sent: Records emitted (as reported by the ``emit`` callback).
        seconds: Clock time from the first wake-up to the end of the loop.
        per_second: Records emitted in each whole second since the start (window *i* covers
            ``[start + i, start + i + 1)``); the last window may be partial.

    """

    sent: int
    seconds: float
    per_second: list[int] = field(default_factory=list)


def run_paced(
    emit: Callable[[int], int],
    *,
    rate: float,
    count: int | None = None,
    duration: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_tick: Callable[[float, int], None] | None = None,
    slice_s: float = SLICE_S,
    max_lag_s: float = MAX_LAG_S,
    chunk: int = UNPACED_CHUNK,
) -> PacedRun:
    """Drive *emit* at *rate* records/s until *count* records or *duration* seconds.

    The loop wakes at most every ``slice_s`` when records are continuously due, asks the
    :class:`Pacer` how many are due and calls ``emit(n)``, which sends up to *n* records
    and returns how many it actually sent (fewer when the producer queue is full; the
    pacer then asks again next wake-up). With both *count* and *duration*, whichever is
    reached first ends the run. A rated run with *duration* schedules
    ``ceil(rate * duration)`` records and stops after the last one, or
    ``DEADLINE_GRACE_S`` after the deadline if it fell behind; an unpaced run stops at
    the deadline.

    Args:
        emit: Sends up to *n* records; returns the number sent (``0 <= sent <= n``).
        rate: Target records per second, ``0`` for unpaced.
        count: Records to send in total, or ``None``.
        duration: Seconds to run, or ``None``.
        clock: Monotonic clock in seconds (injectable for tests).
        sleep: Sleeps the given seconds (injectable; a fake should advance *clock*).
        on_tick: Called after every wake-up with ``(now, sent)``: progress, polling.
        slice_s: See :class:`Pacer`.
        max_lag_s: See :class:`Pacer`.
        chunk: See :class:`Pacer`.

    Returns:
        The :class:`PacedRun` summary.

    Raises:
        ConfigError: neither *count* nor *duration* is given, or *rate* is negative.

    """
    if count is None and duration is None:
        msg = "give a count or a duration: the paced loop needs to know when to stop"
        raise ConfigError(msg)
    if rate < 0:
        msg = f"rate must be >= 0 records/s, got {rate}"
        raise ConfigError(msg)
    limit = sys.maxsize if count is None else count
    if duration is not None and rate > 0:
        limit = min(limit, math.ceil(rate * duration))
    start = clock()
    pacer = Pacer(rate, start, slice_s=slice_s, max_lag_s=max_lag_s, chunk=chunk)
    if duration is None:
        hard_end = math.inf
    else:
        hard_end = start + duration + (DEADLINE_GRACE_S if rate > 0 else 0.0)
    per_second: list[int] = []
    sent = 0
    now = start
    while sent < limit:
        now = clock()
        if now >= hard_end:
            break
        want = min(pacer.take(now, sent), limit - sent)
        if want > 0:
            done = emit(want)
            if done:
                sent += done
                window = int(now - start)
                if window >= len(per_second):
                    per_second.extend([0] * (window + 1 - len(per_second)))
                per_second[window] += done
        if on_tick is not None:
            on_tick(now, sent)
        if sent >= limit:
            break
        wake = min(pacer.next_wake(now, sent), hard_end)
        pause = min(wake - clock(), MAX_SLEEP_S)
        if pause > 0:
            sleep(pause)
    return PacedRun(sent=sent, seconds=clock() - start, per_second=per_second)


# --------------------------------------------------------------------------- kafka shell


@dataclass(frozen=True)
class ProduceResult:
    """Outcome of one harness run.

    Attributes:
        records: Records acknowledged by the broker.
        seconds: Wall time from the first send to the end of the final flush.
        rate: Achieved rate, ``records / seconds``.
        errors: Records that failed delivery, including any still unacknowledged when the
            final flush timed out. A run is a success only if this is 0.
        per_second: Records sent in each second of the run (the last may be partial), for
            measuring how steadily the rate was held.
        first_error: The first delivery error's text, or ``""`` if there was none.
        per_process: Records acknowledged per producer process (one entry per process).

    """

    records: int
    seconds: float
    rate: float
    errors: int
    per_second: tuple[int, ...] = ()
    first_error: str = ""
    per_process: tuple[int, ...] = ()


def resolve_bootstrap(explicit: str | None = None) -> str:
    """The Kafka bootstrap address to use.

    Order: *explicit* (``--kafka-bootstrap``), ``DSTREAM_KAFKA_BOOTSTRAP``, the local dev
    services' ``kafka_bootstrap`` (:func:`ops.tools.devservices.discovered_env`, the one way
    the tooling finds them), then :data:`DEFAULT_BOOTSTRAP`.
    """
    if explicit:
        return explicit
    env = os.environ.get("DSTREAM_KAFKA_BOOTSTRAP", "").strip()
    if env:
        return env
    from ops.tools import devservices

    try:
        found = devservices.discovered_env().get("kafka_bootstrap")
    except Exception:  # no dev services (no state file): fall through to the default
        found = None
    if isinstance(found, str) and found:
        return found
    return DEFAULT_BOOTSTRAP


def kafka_extra_config() -> dict[str, Any]:
    """The librdkafka settings passed through from ``DSTREAM_KAFKA_CONFIG`` (a JSON object).

    Raises:
        ConfigError: the environment holds an invalid ``DSTREAM_*`` value.

    """
    if not os.environ.get("DSTREAM_KAFKA_CONFIG", "").strip():
        return {}
    from ops.config import load_settings

    return dict(load_settings().kafka_config)


def _producer_config(
    bootstrap: str, extra_config: dict[str, Any] | None, *, compression: str | None
) -> dict[str, Any]:
    # Throughput tuning: a short linger lets librdkafka fill batches of hundreds of records
    # at 20k records/s without adding visible latency; idempotence keeps per-key order (and
    # so contiguous seq numbers) across internal retries. Delivery reports only for failed
    # records: an acknowledged record then costs no Python callback (see _Delivery).
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": "dstream-produce",
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 500_000,
        "enable.idempotence": True,
        "acks": "all",
        "delivery.report.only.error": True,
    }
    if compression:
        conf["compression.type"] = compression
    conf.update(extra_config or {})
    conf["bootstrap.servers"] = bootstrap
    return conf


def _quiet_admin(bootstrap: str, extra_config: dict[str, Any] | None) -> Any:
    """An AdminClient for metadata and topic creation that does not log to stderr.

    librdkafka logs every refused connection (about 20 lines a second) while a probe waits
    for an unreachable broker; the probe's own exception says the same in one line.
    """
    from confluent_kafka.admin import AdminClient

    conf = {k: v for k, v in (extra_config or {}).items() if k not in _PRODUCER_ONLY}
    conf["bootstrap.servers"] = bootstrap
    conf.setdefault("log_level", 0)
    return AdminClient(conf)


def _unreachable(bootstrap: str, error: Exception) -> ServiceError:
    msg = (
        f"cannot reach Kafka at {bootstrap}: {error}; "
        "start it with `dstream dev up` or pass --kafka-bootstrap"
    )
    return ServiceError(msg)


def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    *,
    extra_config: dict[str, Any] | None = None,
    timeout: float = METADATA_TIMEOUT_S,
) -> int:
    """Create *topic* with *partitions* partitions if it does not exist.

    Idempotent: an existing topic (also one created concurrently) is left as it is, even
    with a different partition count. The replication factor is the broker's default.
    The runtime's :func:`ops.topics.ensure_topic` does the work (one implementation).

    Returns:
        The topic's partition count after the call.

    Raises:
        ServiceError: the cluster cannot be reached or refuses to create the topic.

    """
    from ops.topics import TopicError
    from ops.topics import ensure_topic as create

    conf = {k: v for k, v in (extra_config or {}).items() if k not in _PRODUCER_ONLY}
    conf["bootstrap.servers"] = bootstrap
    try:
        return create(conf, topic, partitions, timeout=timeout)
    except TopicError as e:
        if e.unreachable:
            cause = e.__cause__
            raise _unreachable(bootstrap, cause if isinstance(cause, Exception) else e) from e
        raise ServiceError(str(e)) from e


_PRODUCER_ONLY = frozenset(
    {
        "linger.ms",
        "batch.num.messages",
        "batch.size",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "enable.idempotence",
        "acks",
        "compression.type",
        "compression.codec",
        "transactional.id",
        "delivery.report.only.error",
    }
)


class _Progress:
    """Throttled progress line on a text stream: records sent, current rate, target."""

    def __init__(self, stream: TextIO, topic: str, target: float, every: float) -> None:
        self.stream = stream
        self.topic = topic
        self.target = target
        self.every = every
        self.tty = stream.isatty()
        self.last_t: float | None = None
        self.last_sent = 0
        self.shown = False

    def __call__(self, now: float, sent: int) -> None:
        if self.last_t is None:
            self.last_t, self.last_sent = now, sent
            return
        dt = now - self.last_t
        if dt < self.every:
            return
        current = (sent - self.last_sent) / dt
        self.last_t, self.last_sent = now, sent
        target = f"{self.target:,.0f}/s" if self.target > 0 else "max"
        line = f"produce {self.topic}: {sent:,} sent, {current:,.0f} rec/s (target {target})"
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class _Delivery:
    """The producer-wide delivery-report callback; it counts failures only.

    The producer runs with ``delivery.report.only.error``, so an acknowledged record costs no
    Python call: records acknowledged = records handed over - failed - still queued after
    the final flush. A success report (if the setting is overridden) is ignored.
    """

    def __init__(self) -> None:
        self.failed = 0
        self.first_error: str | None = None

    def __call__(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed += 1
            if self.first_error is None:
                self.first_error = str(err)


@dataclass
class _SendStats:
    """What the emitter handed to the producer (its own urls only)."""

    handed: int = 0  # accepted by ``produce()``
    refused: int = 0  # refused by ``produce()`` up front (e.g. too large): failed records
    first_refusal: str = ""


def _pageview_emitter(
    produce: Callable[..., Any],
    poll: Callable[[float], Any],
    topic: str,
    stats: _SendStats,
    *,
    keys: int,
    key_dist: str,
    zipf_s: float,
    seed: int,
    fmt: str,
    users: int = DEFAULT_USERS,
    shard: int = 0,
    shards: int = 1,
) -> Callable[[int], int]:
    """The hot loop: ``emit(n)`` walks the next *n* events of the seeded page-view stream.

    The stream is the one :func:`pageview_events` yields for the same arguments: the same
    random draws in the same order (``randrange(n)`` is ``getrandbits`` with rejection,
    inlined here), the same per-url ``seq``. Events of the urls this shard owns
    (``k % shards == shard``) are encoded and handed to the producer, keyed by url, with
    ``ts`` read from the wall clock at that moment; the others are only drawn, so the
    shards of one stream together send every event exactly once, and each url's ``seq`` is
    sent by one process in order. Per event there is no dict and no generator step: the
    JSON value is a bytes template (byte-identical to :func:`encode_event`).

    ``emit`` returns the number of events walked: *n*, or fewer when the producer queue is
    full (the refused event is kept and goes first next time, so ``seq`` order holds).
    """
    from confluent_kafka import KafkaException

    rng = random.Random(seed)  # noqa: S311 - load generation, not cryptography
    getrandbits = rng.getrandbits
    rand = rng.random
    kbits = keys.bit_length()
    ubits = users.bit_length()
    zipf = key_dist == "zipf"
    cum = zipf_cumulative_weights(keys, zipf_s) if zipf else [0.0]
    total = cum[-1]
    last = keys - 1
    bisect_right = bisect.bisect_right
    mine = [k % shards == shard for k in range(keys)]
    url_keys = [f"/page/{k}".encode() for k in range(keys)]
    use_msgpack = fmt == "msgpack"
    urls = [f"/page/{k}" for k in range(keys)] if use_msgpack else []
    user_names = [f"u{u}" for u in range(users)] if use_msgpack else []
    packb = msgpack.packb
    template = _JSON_TEMPLATE
    time_ns = time.time_ns
    seqs = [0] * keys
    carry: list[tuple[int, int, int]] = []  # an owned event the full queue refused

    def emit(n: int) -> int:
        walked = 0
        handed = 0
        while walked < n:
            if carry:
                k, u, seq = carry.pop()
            else:
                if zipf:
                    k = bisect_right(cum, rand() * total)
                    if k > last:
                        k = last
                else:
                    k = getrandbits(kbits)
                    while k >= keys:
                        k = getrandbits(kbits)
                u = getrandbits(ubits)
                while u >= users:
                    u = getrandbits(ubits)
                if not mine[k]:
                    walked += 1
                    continue
                seq = seqs[k]
                seqs[k] = seq + 1
            ts = time_ns() // 1_000_000
            if use_msgpack:
                value = packb(
                    {"url": urls[k], "user": user_names[u], "ts": ts, "seq": seq},
                    use_bin_type=True,
                )
            else:
                value = template % (k, u, ts, seq)
            try:  # positional (partition -1: by key; no per-record callback): 25% cheaper
                produce(topic, value, url_keys[k], -1, None, None, ts)
            except BufferError:
                carry.append((k, u, seq))  # keep the seq order: this event goes first next time
                poll(0.01)  # queue full: let deliveries drain it
                break
            except KafkaException as e:  # refused up front (e.g. too large): a failed record
                stats.refused += 1
                if not stats.first_refusal:
                    stats.first_refusal = str(e.args[0] if e.args else e)
            else:
                handed += 1
            walked += 1
        stats.handed += handed
        poll(0)
        return walked

    return emit


def _check_topic(
    bootstrap: str, topic: str, partitions: int | None, extra_config: dict[str, Any] | None
) -> None:
    """Create the topic if asked to; else fail fast (and quietly) on an unreachable broker."""
    from confluent_kafka import KafkaException

    if partitions is not None:
        ensure_topic(bootstrap, topic, partitions, extra_config=extra_config)
        return
    try:
        _quiet_admin(bootstrap, extra_config).list_topics(timeout=METADATA_TIMEOUT_S)
    except KafkaException as e:
        raise _unreachable(bootstrap, e) from e


def produce_pageviews(
    bootstrap: str,
    topic: str,
    *,
    rate: float,
    count: int | None = None,
    duration: float | None = None,
    keys: int = 1_000,
    key_dist: KeyDist | str = "uniform",
    zipf_s: float = 1.1,
    fmt: ValueFormat | str = "json",
    seed: int = 0,
    partitions: int | None = None,
    progress: bool = False,
    extra_config: dict[str, Any] | None = None,
    compression: str | None = None,
    progress_stream: TextIO | None = None,
    procs: int = 1,
) -> ProduceResult:
    """Produce page-view events to *topic* at *rate* records/s; blocks until all are acked.

    The message key is the url's bytes (so a url always lands in one partition) and the
    value is the event in *fmt*; the Kafka message timestamp is the event's ``ts``. The
    sequence of (url, user, seq) is deterministic given *seed* (it is
    :func:`pageview_events`'s); ``ts`` is the wall clock when the record is handed to the
    producer. The producer is idempotent, so per-key ``seq`` numbers arrive in order and
    without duplicates.

    With ``procs > 1`` the same stream is sent by *procs* child processes (spawned), each
    owning the urls ``k % procs == i``: every child walks the whole seeded schedule (same
    rate, count and duration) but sends only its own urls' events, so together they send
    exactly what one process would, with each url's ``seq`` in order from one idempotent
    producer. The children start sending together once all are connected; the result sums
    theirs (``seconds`` is the longest child's).

    Args:
        bootstrap: Kafka bootstrap servers (see :func:`resolve_bootstrap`).
        topic: Target topic.
        rate: Target records per second; ``0`` means as fast as possible.
        count: Records to produce; ``None`` to run for *duration*.
        duration: Seconds to run; ``None`` to run for *count* (with both, the first reached).
        keys: Distinct urls.
        key_dist: ``"uniform"`` or ``"zipf"``.
        zipf_s: Zipf skew exponent.
        fmt: Value format, ``"json"`` or ``"msgpack"``.
        seed: Seed of the event generator.
        partitions: If given and the topic is missing, create it with this many partitions.
        progress: Print a progress line about twice a second to *progress_stream*.
        extra_config: librdkafka settings applied over the harness defaults.
        compression: ``compression.type`` of the producer, or ``None`` (the default) for
            none: on a local broker compression only costs CPU.
        progress_stream: Where progress goes; default ``sys.stderr``.
        procs: Producer processes to split the urls (and so the rate) across.

    Returns:
        The :class:`ProduceResult`; ``errors > 0`` means some records were not delivered.

    Raises:
        ConfigError: an argument is invalid (checked before connecting).
        ServiceError: Kafka cannot be reached or the topic cannot be created.

    """
    validate_args(
        rate=rate,
        count=count,
        duration=duration,
        keys=keys,
        key_dist=key_dist,
        zipf_s=zipf_s,
        fmt=fmt,
        partitions=partitions,
        procs=procs,
    )
    _check_topic(bootstrap, topic, partitions, extra_config)
    reporter = (
        _Progress(progress_stream or sys.stderr, topic, rate, PROGRESS_EVERY_S)
        if progress
        else None
    )
    job: dict[str, Any] = {
        "rate": rate,
        "count": count,
        "duration": duration,
        "keys": keys,
        "key_dist": key_dist,
        "zipf_s": zipf_s,
        "fmt": fmt,
        "seed": seed,
        "extra_config": extra_config,
        "compression": compression,
    }
    try:
        if procs > 1:
            return _produce_parallel(bootstrap, topic, job, procs, reporter)
        return _produce_shard(bootstrap, topic, job, on_tick=reporter)
    finally:
        if reporter is not None:
            reporter.close()


def _produce_shard(
    bootstrap: str,
    topic: str,
    job: dict[str, Any],
    *,
    shard: int = 0,
    shards: int = 1,
    on_tick: Callable[[float, int], None] | None = None,
    on_sent: Callable[[int], None] | None = None,
    ready: Callable[[], None] | None = None,
) -> ProduceResult:
    """One producer process's run: shard *shard* of *shards* of the stream *job* describes.

    *ready* is called once the producer is connected, just before sending starts (a child
    reports in and waits for the others there). *on_tick* gets ``(now, events walked)``
    after every wake-up, *on_sent* the records sent so far (a child's progress slot).
    """
    from confluent_kafka import KafkaException, Producer

    delivery = _Delivery()
    conf = _producer_config(bootstrap, job["extra_config"], compression=job["compression"])
    conf["on_delivery"] = delivery
    try:
        producer = Producer(conf)
    except KafkaException as e:
        msg = f"invalid Kafka producer configuration: {e}"
        raise ConfigError(msg) from e
    if ready is not None:
        with contextlib.suppress(KafkaException):  # warm up: connect before the start line
            producer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        ready()
    stats = _SendStats()
    emitter = _pageview_emitter(
        producer.produce,
        producer.poll,
        topic,
        stats,
        keys=job["keys"],
        key_dist=job["key_dist"],
        zipf_s=job["zipf_s"],
        seed=job["seed"],
        fmt=job["fmt"],
        shard=shard,
        shards=shards,
    )

    def emit(n: int) -> int:  # a backlog goes in pieces: ticks (progress, counts) keep coming
        return emitter(min(n, MAX_EMIT))

    own_per_second: list[int] = []
    counted = 0
    t0 = time.monotonic()

    def tick(now: float, walked: int) -> None:
        nonlocal counted
        if shards > 1:  # count this shard's own records per second, not the events walked
            sent = stats.handed + stats.refused
            window = int(now - t0)
            if window >= len(own_per_second):
                own_per_second.extend([0] * (window + 1 - len(own_per_second)))
            own_per_second[window] += sent - counted
            counted = sent
            if on_sent is not None:
                on_sent(sent)
        if on_tick is not None:
            on_tick(now, walked)

    rate, count, duration = job["rate"], job["count"], job["duration"]
    try:
        run = run_paced(emit, rate=rate, count=count, duration=duration, on_tick=tick)
    finally:
        remaining = producer.flush(FLUSH_TIMEOUT_S)
    seconds = time.monotonic() - t0
    errors = delivery.failed + stats.refused + remaining
    records = stats.handed - delivery.failed - remaining
    return ProduceResult(
        records=records,
        seconds=seconds,
        rate=records / seconds if seconds > 0 else 0.0,
        errors=errors,
        per_second=tuple(run.per_second if shards == 1 else own_per_second),
        per_process=(records,),
        first_error=stats.first_refusal
        or delivery.first_error
        or (
            f"{remaining} records unacknowledged after {FLUSH_TIMEOUT_S:.0f} s" if remaining else ""
        ),
    )


# --------------------------------------------------------------------------- processes

#: How long a child waits for the start signal before giving up (the parent is gone).
START_TIMEOUT_S = 120.0

#: How often the parent looks at its children (progress, a child that died).
WATCH_EVERY_S = 0.1

#: Errors a child reports that the parent raises as they are; any other becomes a
#: :class:`ServiceError` naming the child.
_ERRORS: dict[str, type[Exception]] = {"ConfigError": ConfigError, "ServiceError": ServiceError}


def _shard_main(
    inbox: Any,
    go: Any,
    progress: Any,
    shard: int,
    shards: int,
    bootstrap: str,
    topic: str,
    job: dict[str, Any],
) -> None:
    """Body of child process *shard*: report ``ready``, wait for *go*, send, report."""

    def ready() -> None:
        inbox.put(("ready", shard, None))
        if not go.wait(START_TIMEOUT_S):
            msg = f"producer process {shard} got no start signal in {START_TIMEOUT_S:.0f} s"
            raise ServiceError(msg)

    def on_sent(sent: int) -> None:
        progress[shard] = sent

    try:
        result = _produce_shard(
            bootstrap, topic, job, shard=shard, shards=shards, on_sent=on_sent, ready=ready
        )
    except (Exception, KeyboardInterrupt) as e:  # reported, raised by the parent
        inbox.put(("error", shard, (type(e).__name__, str(e) or "no message")))
        return
    inbox.put(("result", shard, result))


def _merge(results: list[ProduceResult]) -> ProduceResult:
    """One result for the children's: sums, the longest run, per-second counts added up."""
    records = sum(r.records for r in results)
    seconds = max(r.seconds for r in results)
    width = max(len(r.per_second) for r in results)
    per_second = [0] * width
    for r in results:
        for i, n in enumerate(r.per_second):
            per_second[i] += n
    return ProduceResult(
        records=records,
        seconds=seconds,
        rate=records / seconds if seconds > 0 else 0.0,
        errors=sum(r.errors for r in results),
        per_second=tuple(per_second),
        first_error=next((r.first_error for r in results if r.first_error), ""),
        per_process=tuple(r.records for r in results),
    )


def _produce_parallel(
    bootstrap: str,
    topic: str,
    job: dict[str, Any],
    procs: int,
    reporter: _Progress | None,
) -> ProduceResult:
    """Run *procs* children of :func:`_shard_main`; merge their results.

    Children are spawned (never forked: this process may run librdkafka threads), connect,
    report ready and start sending together. Progress sums their shared counters. A child
    error is raised here once every other child stopped (asked to with SIGINT once sending
    started, so that it flushes what it sent; terminated before). Children are daemons, so
    they never outlive this process.
    """
    import multiprocessing
    import queue
    import signal

    ctx = multiprocessing.get_context("spawn")
    inbox = ctx.Queue()
    go = ctx.Event()
    progress = ctx.Array("q", procs, lock=False)
    children = [
        ctx.Process(
            target=_shard_main,
            args=(inbox, go, progress, i, procs, bootstrap, topic, job),
            name=f"dstream-produce-{i}",
            daemon=True,
        )
        for i in range(procs)
    ]
    results: list[ProduceResult | None] = [None] * procs
    ready = 0
    done = False
    try:
        for child in children:
            child.start()
        while any(r is None for r in results):
            try:
                kind, shard, payload = inbox.get(timeout=WATCH_EVERY_S)
            except queue.Empty:
                for i, child in enumerate(children):
                    if results[i] is None and not child.is_alive():
                        with contextlib.suppress(queue.Empty):  # it may have just reported
                            kind, shard, payload = inbox.get(timeout=1.0)
                            break
                        msg = f"producer process {i} exited with code {child.exitcode}"
                        raise ServiceError(msg) from None
                else:
                    if reporter is not None and go.is_set():
                        reporter(time.monotonic(), sum(progress))
                    continue
            if kind == "ready":
                ready += 1
                if ready == procs:
                    go.set()
                    if reporter is not None:
                        reporter(time.monotonic(), 0)
            elif kind == "result":
                results[shard] = payload
            else:
                name, text = payload
                if name in _ERRORS:
                    raise _ERRORS[name](text)
                msg = f"producer process {shard} failed: {name}: {text}"
                raise ServiceError(msg)
        done = True
    finally:
        if not done:
            for child in children:
                if not (child.is_alive() and child.pid is not None):
                    continue
                if go.is_set():  # sending: SIGINT, so that it flushes what it sent
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGINT)
                else:  # still starting up or waiting: nothing sent, nothing to flush
                    child.terminate()
        for child in children:
            if child.pid is None:
                continue
            child.join(FLUSH_TIMEOUT_S + 5 if done else 10)
            if child.is_alive():
                child.kill()
                child.join()
        inbox.close()
    return _merge([r for r in results if r is not None])
