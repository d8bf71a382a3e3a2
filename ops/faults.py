"""Fault injection for tests: inert unless its environment variables are set.

* ``DSTREAM_FAULT_CRASH=<point>[:<n>]``: the process kills itself with SIGKILL the n-th
  time (default first) it reaches ``<point>``: ``after_compute``, ``after_kafka_commit``,
  ``before_redis_commit``, ``during_checkpoint``, ``during_recovery``, ``coordinator_seal``.
* ``DSTREAM_FAULT_SLOW=<factor>``: one worker runs every task ``factor`` times slower.
* ``DSTREAM_FAULT_DIR=<dir>``: where processes claim a fault, so that one process of a
  fleet (the first to get there) takes it. Without it, every process may.

The switches are read once, when the process starts (they are set on the processes a test
starts): off the switch, a crash point on the hot path costs one string comparison.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("dstream.faults")
_counts: collections.Counter[str] = collections.Counter()
#: ``DSTREAM_FAULT_CRASH`` as (point, n-th time), read at start; ("", 0) when off
_point, _, _nth = (os.environ.get("DSTREAM_FAULT_CRASH") or "").partition(":")
_CRASH = (_point, int(_nth or 1))
CRASH_POINTS = (
    "after_compute",
    "after_kafka_commit",
    "before_redis_commit",
    "during_checkpoint",
    "during_recovery",
    "coordinator_seal",
)


def _claim(name: str) -> bool:
    d = os.environ.get("DSTREAM_FAULT_DIR")
    if not d:
        return True
    try:
        fd = os.open(Path(d) / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def crash_point(name: str) -> None:
    """Die here (SIGKILL, no cleanup) if the crash switch names this point."""
    if _CRASH[0] != name:
        return
    _counts[name] += 1
    if _counts[name] != _CRASH[1] or not _claim(f"crash-{name}"):
        return
    log.warning("fault injection: crashing at %s", name)
    os.kill(os.getpid(), signal.SIGKILL)


def slow_factor() -> float:
    """The slow-task factor this process took (1.0 when none), claimed once at start."""
    raw = os.environ.get("DSTREAM_FAULT_SLOW")
    if not raw or not _claim("slow"):
        return 1.0
    log.warning("fault injection: this worker runs tasks %sx slower", raw)
    return float(raw)
