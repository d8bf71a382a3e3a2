"""Waiting for Kafka and Redis at start: one line per silent dependency, backoff, a bound.

A coordinator, a worker and ``dstream run`` check, before they rely on them, that the
dependencies their app needs answer: Kafka (a metadata request) and Redis (``PING``).
One that does not answer is reported once, in one line naming its address and what was
tried::

    kafka at 127.0.0.1:9 did not answer (metadata request, 1 try over 5.0 s: ...);
    retrying with backoff for up to 60 s (DSTREAM_STARTUP_TIMEOUT)

and tried again with exponential backoff (:class:`Backoff`) until it answers (one INFO
line says so) or ``startup_timeout`` runs out: then :class:`DependencyUnreachable` ends
the process with one line (``dstream: ...``, exit code 1), which a Kubernetes pod's
restart policy answers by starting it again.

:class:`StartupWait` decides (what to probe, how long to sleep, when to give up) from the
results it is told and the time it is given: pure, unit-tested without services or a
clock. :func:`wait_for_dependencies` is the I/O shell around it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from engine.errors import DStreamError
from engine.graph import Node

__all__ = [
    "MIN_TRY_S",
    "TRY_TIMEOUT_S",
    "Backoff",
    "Dependency",
    "DependencyUnreachable",
    "GiveUp",
    "Probe",
    "Ready",
    "Say",
    "Sleep",
    "StartupWait",
    "app_dependencies",
    "kafka",
    "kafka_reason",
    "needs_kafka",
    "needs_redis",
    "redis",
    "wait_for_dependencies",
]

log = logging.getLogger("dstream.startup")

#: Bound on one try (a metadata request, a PING): a live broker or server answers in
#: milliseconds, a loaded one within a second or two; 5 s is also the Redis clients'
#: socket timeout (:data:`ops.services.REDIS_TIMEOUT_S`).
TRY_TIMEOUT_S = 5.0
#: The shortest try: the last one before the bound still gives a live service time to answer.
MIN_TRY_S = 0.5


class DependencyUnreachable(DStreamError):
    """Kafka or Redis did not answer within the start-up bound; the message is one line.

    Attributes:
        names: the dependencies that did not answer (``"kafka"``, ``"redis"``).

    """

    def __init__(self, message: str, names: Sequence[str]) -> None:
        super().__init__(message)
        self.names = tuple(names)


@dataclass(frozen=True)
class Dependency:
    """A service the process needs at start.

    Attributes:
        name: ``"kafka"`` or ``"redis"``.
        address: where it was looked for, as messages show it (no password).
        request: what a try sends (``"metadata request"``, ``"PING"``).

    """

    name: str
    address: str
    request: str


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between rounds of tries: *first_s*, doubling, at most *max_s*.

    The defaults retry quickly a service that is a moment late (a pod starting beside its
    broker) and then every 8 s, so a 60 s bound makes about 8 tries of each dependency.
    """

    first_s: float = 0.5
    factor: float = 2.0
    max_s: float = 8.0

    def delay(self, failed_rounds: int) -> float:
        """Seconds to sleep after the *failed_rounds*-th round that left something silent."""
        return float(min(self.max_s, self.first_s * self.factor ** max(0, failed_rounds - 1)))


@dataclass(frozen=True)
class Probe:
    """Try each of *deps*, each try bounded by *timeout_s*, then report with ``tried``."""

    deps: tuple[Dependency, ...]
    timeout_s: float


@dataclass(frozen=True)
class Sleep:
    """Wait *seconds* before the next round."""

    seconds: float


@dataclass(frozen=True)
class Ready:
    """Every dependency answered."""


@dataclass(frozen=True)
class GiveUp:
    """The bound ran out: end the process with *line*; *names* did not answer."""

    line: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class Say:
    """A line to log at *level*."""

    level: int
    line: str


@dataclass
class _Tries:
    tries: int = 0
    answered: bool = False
    last_error: str = ""
    last_at: float = 0.0
    reported: bool = False


def _plural(n: int) -> str:
    return f"{n} try" if n == 1 else f"{n} tries"


@dataclass
class StartupWait:
    """The start-up wait as a state machine: ``next(now)`` says what to do, ``tried`` hears back.

    Rounds: probe every dependency not yet answered, then (if one is still silent) sleep
    the backoff, capped at what is left of *bound_s*; when nothing is left, give up. A
    silent dependency is reported once, after its first failed try; one that answers
    after failing is reported at INFO. Deterministic: times come from the caller.
    """

    deps: Sequence[Dependency]
    bound_s: float
    started: float
    backoff: Backoff = field(default_factory=Backoff)
    try_timeout_s: float = TRY_TIMEOUT_S
    _state: dict[str, _Tries] = field(init=False, default_factory=dict)
    _rounds: int = field(init=False, default=0)
    _sleep_next: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._state = {d.name: _Tries() for d in self.deps}

    def pending(self) -> tuple[Dependency, ...]:
        """The dependencies that have not answered yet, in the order given."""
        return tuple(d for d in self.deps if not self._state[d.name].answered)

    def next(self, now: float) -> Probe | Sleep | Ready | GiveUp:
        """What to do at *now*: probe, sleep, carry on (:class:`Ready`) or give up."""
        pending = self.pending()
        if not pending:
            return Ready()
        left = self.bound_s - (now - self.started)
        if left <= 0:
            return self._give_up(pending, now)
        if self._sleep_next:
            self._sleep_next = False
            return Sleep(min(self.backoff.delay(self._rounds), left))
        self._rounds += 1
        self._sleep_next = True
        return Probe(pending, max(MIN_TRY_S, min(self.try_timeout_s, left)))

    def tried(self, dep: Dependency, ok: bool, now: float, error: str = "") -> list[Say]:
        """Hear the result of a try of *dep* that ended at *now*; the lines to log."""
        st = self._state[dep.name]
        st.tries += 1
        st.last_at = now
        spent = now - self.started
        if ok:
            st.answered = True
            if st.tries == 1:
                return []
            return [
                Say(
                    logging.INFO,
                    f"{dep.name} at {dep.address} answered after "
                    f"{_plural(st.tries)} ({spent:.1f} s)",
                )
            ]
        st.last_error = error
        if st.reported:
            return []
        st.reported = True
        return [
            Say(
                logging.WARNING,
                f"{self._silent(dep, st)}; retrying with backoff for up to {self.bound_s:g} s "
                "(DSTREAM_STARTUP_TIMEOUT)",
            )
        ]

    def _silent(self, dep: Dependency, st: _Tries, now: float | None = None) -> str:
        """*dep* did not answer: its tries, over the time since start (to *now* or its last)."""
        spent = (st.last_at if now is None else now) - self.started
        why = f": {st.last_error}" if st.last_error else ""
        return (
            f"{dep.name} at {dep.address} did not answer "
            f"({dep.request}, {_plural(st.tries)} over {spent:.1f} s{why})"
        )

    def _give_up(self, pending: tuple[Dependency, ...], now: float) -> GiveUp:
        silent = "; ".join(self._silent(d, self._state[d.name], now) for d in pending)
        line = (
            f"{silent}; gave up after {self.bound_s:g} s (DSTREAM_STARTUP_TIMEOUT): check the "
            "address and that the service is up"
        )
        return GiveUp(line, tuple(d.name for d in pending))


# -- which dependencies an app needs ---------------------------------------------------------
def needs_kafka(nodes: Iterable[Node]) -> bool:
    """Whether an app reads or writes Kafka (a ``kafka_stream`` or a ``to_kafka``)."""
    return any(
        (n.kind == "source" and n.args.get("source") == "kafka")
        or (n.kind == "output" and n.args.get("sink") == "kafka")
        for n in nodes
    )


def needs_redis(nodes: Iterable[Node]) -> bool:
    """Whether a worker of the app uses Redis: checkpointed state or a ``to_redis`` output.

    (A coordinator always does: its metadata log and lease are in Redis.)
    """
    return any(
        n.kind == "state"
        or (n.kind == "window_combine" and n.args.get("inv_fn") is not None)
        or (n.kind == "output" and n.args.get("sink") == "redis")
        for n in nodes
    )


def app_dependencies(
    settings: Any, nodes: Iterable[Node], app_id: str, *, coordinator: bool
) -> list[Dependency]:
    """The dependencies a process of the app needs at start, in the order they are tried.

    Kafka when the app reads or writes it (or has a dead-letter topic:
    :func:`ops.topics.output_topics`); Redis for a coordinator (its metadata log and lease)
    and for a worker of an app with checkpointed state or a Redis output.
    """
    from ops.topics import output_topics

    nodes = list(nodes)
    deps = []
    if needs_kafka(nodes) or output_topics(nodes, settings, app_id):
        deps.append(kafka(settings))
    if coordinator or needs_redis(nodes):
        deps.append(redis(settings))
    return deps


# -- the I/O shell ---------------------------------------------------------------------------
def kafka(settings: Any) -> Dependency:
    """Kafka as the settings name it (``kafka_bootstrap``)."""
    return Dependency("kafka", settings.kafka_bootstrap, "metadata request")


def redis(settings: Any) -> Dependency:
    """Redis as the settings name it (``redis_url``, its password hidden)."""
    from ops.config import redact_url

    return Dependency("redis", redact_url(settings.redis_url.get_secret_value()), "PING")


def kafka_reason(error: BaseException) -> str:
    """What a ``KafkaException`` says, without its ``KafkaError{code=...}`` wrapping."""
    from confluent_kafka import KafkaError

    err = error.args[0] if error.args else None
    return str(err.str()) if isinstance(err, KafkaError) else str(error)


def _try_kafka(settings: Any, timeout: float) -> str | None:
    """One metadata request; None when Kafka answered, else why not (one line)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_client_config())
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as e:
        return kafka_reason(e)
    finally:
        admin.poll(0)  # hand librdkafka's lines of this try to the (deduplicating) logger
    return None


def _try_redis(settings: Any, timeout: float) -> str | None:
    """One PING; None when Redis answered, else why not (one line)."""
    from ops.services import redis_client

    client = redis_client(settings, timeout=max(0.1, timeout))
    try:
        client.ping()
    except Exception as e:  # redis' ConnectionError, TimeoutError, AuthenticationError...
        return f"{type(e).__name__}: {e}".replace("\n", " ")
    finally:
        client.close()
    return None


_TRIES: dict[str, Callable[[Any, float], str | None]] = {"kafka": _try_kafka, "redis": _try_redis}


def wait_for_dependencies(
    settings: Any,
    deps: Sequence[Dependency],
    stop: threading.Event | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Block until every one of *deps* answers; False when *stop* was set meanwhile.

    Called at start by a coordinator (before its first Kafka metadata call and Redis
    read), a worker (once it serves its probes) and ``dstream run`` (before it starts
    the fleet). Logs one line per dependency that does not answer and one when it does.

    Raises:
        DependencyUnreachable: ``settings.startup_timeout`` ran out with a dependency
            still silent; the message is the one line to show.

    """
    wait = StartupWait(deps, settings.startup_timeout, clock())
    stop = stop or threading.Event()
    while True:
        step = wait.next(clock())
        if isinstance(step, Ready):
            return True
        if isinstance(step, GiveUp):
            raise DependencyUnreachable(step.line, step.names)
        if isinstance(step, Sleep):
            if stop.wait(step.seconds):
                return False
            continue
        # the dependencies are tried side by side: a quick refusal is not reported late
        with ThreadPoolExecutor(len(step.deps), thread_name_prefix="startup") as pool:
            tries = {pool.submit(_TRIES[d.name], settings, step.timeout_s): d for d in step.deps}
            for done in as_completed(tries):
                error = done.result()
                for say in wait.tried(tries[done], error is None, clock(), error or ""):
                    log.log(say.level, say.line)
        if stop.is_set():
            return False
