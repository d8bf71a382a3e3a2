"""Liveness probes: a worker whose task runs long is pinged; no answer sets it apart.

The batch clock notices a paused worker at the next seal it misses, up to an interval and
a half after the pause; a batch already running when the worker stopped would wait that
long for the tasks it holds. :class:`Prober` (the leader's ``probe`` thread) pings every
worker with a task attempt running longer than :meth:`Prober.age_s` (half the probe wait),
at most once per the probe wait (:meth:`Prober.wait_s`); a ping not answered within the
wait sets the worker apart
(``Scheduler.set_unresponsive``: its attempts rerun elsewhere, the blocks only it holds
are rebuilt, its outputs move). A ping costs a healthy worker one small call; one
answered late, or the worker's next seal answer, takes it back (as after a missed seal,
``BatchClock``). A ping that fails outright (a refused connection) changes nothing: the
heartbeat timeout declares a dead worker lost.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from engine.scheduler import Scheduler
from ops import metrics
from ops.coordinator.dispatch import Dispatcher
from ops.coordinator.membership import Membership, WorkerInfo
from ops.rpc import RpcTimeout

log = logging.getLogger("dstream.coordinator")

#: share of the batch interval a ping waits for its answer, and the least time between two
#: pings of a worker (at least :data:`PROBE_MIN_S`)
PROBE_FRACTION = 0.25
PROBE_MIN_S = 0.25
#: share of the probe wait a task runs before its worker is pinged: a worker paused while
#: a task of it runs is set apart this much plus the wait after the task started (0.375 s
#: at 1 s batches; with the whole wait, 0.5 s)
PROBE_AGE_SHARE = 0.5
#: how often the leader looks for long-running tasks
PROBE_EVERY_S = 0.05
#: pings in flight at most (each takes a thread for at most the deadline)
MAX_PROBES = 4


class Prober:
    """Pings the workers of long-running tasks; sets apart those that do not answer.

    Args:
        interval_s: the batch interval (the probe wait is a share of it).
        scheduler, membership, dispatcher: the leader's; used with *lock* held.
        may_act: False while this coordinator may not act (not the leader, lease lapsed).

    """

    def __init__(
        self,
        *,
        interval_s: float,
        scheduler: Scheduler,
        membership: Membership,
        dispatcher: Dispatcher,
        lock: threading.RLock,
        stopping: threading.Event,
        may_act: Callable[[str], bool],
    ) -> None:
        self.interval_s = interval_s
        self.scheduler = scheduler
        self.membership = membership
        self.dispatcher = dispatcher
        self.lock = lock
        self.stopping = stopping
        self.may_act = may_act
        self._pool = ThreadPoolExecutor(MAX_PROBES, thread_name_prefix="probe")
        #: worker id -> when it was last pinged (monotonic), for pings within the wait
        self._pinged: dict[str, float] = {}
        #: workers with a ping in flight
        self._probing: set[str] = set()

    def wait_s(self) -> float:
        """How long a ping waits for its answer, and the least time between two pings."""
        return max(self.interval_s * PROBE_FRACTION, PROBE_MIN_S)

    def age_s(self) -> float:
        """How long a task attempt runs before its worker is pinged."""
        return self.wait_s() * PROBE_AGE_SHARE

    def run(self) -> None:
        """The ``probe`` thread: :meth:`probe` every :data:`PROBE_EVERY_S` until stopped."""
        while not self.stopping.wait(PROBE_EVERY_S):
            if not self.may_act("probe workers"):
                continue
            try:
                self.probe(time.monotonic())
            except Exception:
                if not self.stopping.is_set():
                    log.exception("probing workers failed")

    def probe(self, now: float) -> list[str]:
        """Ping the workers due for a probe at *now*; their ids."""
        wait = self.wait_s()
        with self.lock:
            slow = self.scheduler.running_longer_than(now, self.age_s())
            if not slow:
                return []
            apart = set(self.scheduler.unresponsive())
            due: list[WorkerInfo] = []
            for wid in sorted(slow - apart - self._probing):
                if len(self._probing) + len(due) >= MAX_PROBES:
                    break
                if now - self._pinged.get(wid, -wait) < wait:
                    continue
                w = self.membership.get(wid)
                if w is not None:
                    due.append(w)
            # a ping older than the wait no longer limits anything: forget it
            self._pinged = {w: t for w, t in self._pinged.items() if now - t < wait}
            for w in due:
                self._pinged[w.id] = now
                self._probing.add(w.id)
        for w in due:
            f = self._pool.submit(w.client.call, "ping", None, wait)
            f.add_done_callback(functools.partial(self._answered, w.id, wait))
        return [w.id for w in due]

    def _answered(self, wid: str, wait: float, f: Future[Any]) -> None:
        with self.lock:
            self._probing.discard(wid)
            if f.cancelled() or self.stopping.is_set() or not isinstance(f.exception(), RpcTimeout):
                return
            if not self.may_act("set a worker apart"):
                return
            if wid not in self.membership or wid in self.scheduler.unresponsive():
                return
            log.warning(
                "worker %s did not answer a ping within %.2f s while its task ran: its work "
                "runs elsewhere until it answers a seal",
                wid,
                wait,
            )
            metrics.MISSED_PROBES.inc()
            self.dispatcher.apply(self.scheduler.set_unresponsive(wid))
            self.dispatcher.dispatch()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
