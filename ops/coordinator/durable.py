"""Metadata writes that must happen: retried while Redis is away, never past a fence."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from engine.errors import FencedError
from ops import metrics

log = logging.getLogger("dstream.coordinator")

T = TypeVar("T")

#: First and longest wait between two attempts at a write while Redis is unreachable.
FIRST_RETRY_S = 0.1
MAX_RETRY_S = 2.0


class DurableWriter:
    """Runs a Redis write until it succeeds; a fencing error is not retried.

    Args:
        stopping: set when the coordinator stops; a retry wait it interrupts re-raises.
        on_fenced: called once a write is fenced (another coordinator leads: step down
            at once, without waiting for the next lease renewal).

    The fleet waits (degraded, said once in the log and in a metric) rather than go on
    without the metadata it must write first.

    """

    def __init__(self, stopping: threading.Event, on_fenced: Callable[[], None]) -> None:
        self.stopping = stopping
        self.on_fenced = on_fenced

    def write(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, retried with back-off on connection errors; *what* names it in logs."""
        import redis

        delay = FIRST_RETRY_S
        degraded = False
        while True:
            try:
                result = fn(*args)
            except FencedError:
                self.on_fenced()
                raise
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if not degraded:
                    degraded = True
                    metrics.DEGRADED.labels(dependency="redis").set(1)
                    log.warning("redis unavailable (%s: %s): waiting and retrying", what, e)
                if self.stopping.wait(delay):
                    raise
                delay = min(MAX_RETRY_S, delay * 2)
                continue
            if degraded:
                metrics.DEGRADED.labels(dependency="redis").set(0)
                log.warning("redis available again (%s)", what)
            return result
