"""Tasks that keep failing: noticed once, and cleared when they succeed.

The scheduler retries a failed task with exponential backoff (50 ms doubling, at most
2 s: :meth:`engine.scheduler.Scheduler.task_failed`), so a dependency outage is no hot
loop - but it is also silent. :class:`RetryWatch` follows each task from its first
failure: once it has kept failing for longer than ``task_retry_alert_seconds`` it says so
once (the caller logs one ERROR line naming the task and its last error, and sets the
``dstream_stuck_tasks`` gauge); a success clears it. Pure: the caller passes the time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class _Failing:
    since: float
    error: str
    failures: int = 1
    alerted: bool = False


@dataclass(frozen=True)
class StuckTask:
    """A task failing for longer than the bound: what the ERROR line says."""

    task: str
    seconds: float
    failures: int
    error: str

    def __str__(self) -> str:
        return (
            f"task {self.task} has kept failing for {self.seconds:.0f} s "
            f"({self.failures} attempts); last error: {self.error}"
        )


class RetryWatch:
    """First failure time and last error of every task failing now.

    Args:
        alert_after: seconds of failing after which a task is reported (once).

    """

    def __init__(self, alert_after: float) -> None:
        self.alert_after = alert_after
        self._failing: dict[str, _Failing] = {}

    def failed(self, task: str, error: str, now: float) -> StuckTask | None:
        """An attempt of *task* failed; a :class:`StuckTask` the first time it is overdue."""
        f = self._failing.get(task)
        if f is None:
            self._failing[task] = f = _Failing(now, error)
        else:
            f.failures += 1
            f.error = error
        if not f.alerted and now - f.since > self.alert_after:
            f.alerted = True
            return StuckTask(task, now - f.since, f.failures, error)
        return None

    def succeeded(self, task: str) -> StuckTask | None:
        """*task* finished: forgotten; returned if it had been reported (to say it is over)."""
        f = self._failing.pop(task, None)
        if f is not None and f.alerted:
            return StuckTask(task, 0.0, f.failures, f.error)
        return None

    def forget(self, live: Iterable[str]) -> None:
        """Keep only tasks in *live* (the others left the scheduler: their batch is gone)."""
        keep = set(live)
        for t in [t for t in self._failing if t not in keep]:
            del self._failing[t]

    @property
    def stuck(self) -> int:
        """Tasks reported and not yet succeeded (the ``dstream_stuck_tasks`` gauge)."""
        return sum(1 for f in self._failing.values() if f.alerted)

    def failing(self) -> int:
        return len(self._failing)
