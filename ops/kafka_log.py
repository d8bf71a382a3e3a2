"""librdkafka's own log lines, through the project's logging: ``dstream.kafka``, deduplicated.

Every Kafka client the runtime builds gets its configuration from
:meth:`ops.config.Settings.kafka_client_config`, which sets confluent-kafka's ``logger``
key to :data:`KAFKA_LOGGER`. librdkafka then hands its lines to that logger instead of
printing them on stderr (``%3|1796045050.015|FAIL|rdkafka#producer-1| ...``): a
consumer's or producer's lines arrive when it is polled (in the polling thread), an admin
client's are held until it is polled or closed. librdkafka's ``log_level`` setting (syslog
levels, default 6) still filters at the source; ``debug`` contexts arrive at DEBUG, so
``DSTREAM_KAFKA_CONFIG='{"debug": "broker"}'`` needs ``--log-level debug`` to show.

A broker that refuses connections makes librdkafka log a ``FAIL`` line per reconnect
(about 20 a second at the start of its backoff): the :class:`RepeatFilter` on the logger
lets the first line of a kind through and holds back the repeats for
:data:`REPEAT_WINDOW_S`, then lets one through again with the count it held back.
Connection failures (``FAIL``), which librdkafka retries by itself, come through at
WARNING rather than ERROR: what the process does about them is said by its own lines
(:mod:`ops.startup` at start).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

__all__ = ["KAFKA_LOGGER", "REPEAT_WINDOW_S", "RepeatFilter", "kafka_logger"]

#: The logger librdkafka's lines go to.
KAFKA_LOGGER = "dstream.kafka"
#: A repeated line (same facility and text, durations aside) passes once per this many
#: seconds: a dead broker costs a line a minute per kind of failure, and the count of the
#: repeats says how hard librdkafka is trying.
REPEAT_WINDOW_S = 60.0
#: librdkafka facilities whose ERROR lines come through at WARNING (it retries them itself).
_RETRIED_FACILITIES = frozenset({"FAIL"})
#: Kinds of line remembered at most (then forgotten all at once): bounded memory.
_MAX_KINDS = 1024
#: The parts of a librdkafka line that differ between repeats of one failure.
_VARYING = re.compile(r"\d+ms\b|\d+ identical error\(s\) suppressed|\d+/\d+ brokers")


def _kind(record: logging.LogRecord) -> tuple[str, str]:
    """The facility and the text of a librdkafka line without what varies between repeats.

    confluent-kafka logs ``("%s [%s] %s", facility, client name, text)``; the client name
    (``rdkafka#producer-3``) is left out, so the same failure seen by several clients of
    one process is one kind.
    """
    args = record.args
    if isinstance(args, tuple) and len(args) == 3 and record.msg == "%s [%s] %s":
        return str(args[0]), _VARYING.sub("#", str(args[2]))
    return "", _VARYING.sub("#", record.getMessage())


class RepeatFilter(logging.Filter):
    """Pass the first line of each kind, then one per *window_s* with the repeats counted.

    Deterministic given the clock (injected for tests); thread-safe (librdkafka's lines
    arrive on whichever thread polls a client).
    """

    def __init__(
        self, window_s: float = REPEAT_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self.held_back = 0
        self._seen: dict[tuple[str, str], list[float]] = {}  # kind -> [passed at, held]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether *record* is emitted; lowers a retried failure to WARNING, notes repeats."""
        kind = _kind(record)
        now = self.clock()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                self.held_back += 1
                return False
            if len(self._seen) >= _MAX_KINDS:
                self._seen.clear()
            self._seen[kind] = [now, 0]
        if seen is not None and seen[1]:
            repeats, since = int(seen[1]), now - seen[0]
            record.msg = (
                f"{record.getMessage()} (repeated {repeats} times in the last {since:.0f} s)"
            )
            record.args = None
        if kind[0] in _RETRIED_FACILITIES and record.levelno > logging.WARNING:
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
        return True


_setup_lock = threading.Lock()


def kafka_logger() -> logging.Logger:
    """The logger of every Kafka client (:data:`KAFKA_LOGGER`), with its :class:`RepeatFilter`.

    Idempotent: the filter is added once per process.
    """
    logger = logging.getLogger(KAFKA_LOGGER)
    with _setup_lock:
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter())
    return logger
