"""The leader lease: which coordinator may act, and for how long it is sure of it.

Any number of coordinators compete for one Redis lease (:meth:`state.metalog.MetaLog.
acquire_lease`); taking it bumps the epoch, the fencing token every metadata write and
every coordinator -> worker call carries. :class:`LeaderElection` runs the competition
on its own thread and answers the two questions the other roles ask: :meth:`holds_lease`
(answer workers, as the leader) and :meth:`leads` / :meth:`may_act` (seal, grant, declare
lost: only while no other coordinator can have taken the lease).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from engine.errors import MetadataLostError
from ops import metrics
from state.metalog import Lease, MetaLog

log = logging.getLogger("dstream.coordinator")

#: A standby tries to take a free lease this often.
LEASE_RETRY_S = 0.2
#: A leader stops acting this long before its lease could have expired in Redis (the
#: lease is measured from Redis' receipt of the renewal, after the local clock started).
LEASE_MARGIN_S = 0.5


class LeaderElection:
    """Takes the lease when it is free, renews it, and steps down when deposed.

    Args:
        metalog: where the lease lives.
        holder: the coordinator's name on the lease (its RPC address), asked when needed.
        ttl_s: the lease's length (``lease_seconds``).
        stopping: the coordinator's stop event; stepping down sets it.
        on_lead: called on the election thread with the new lease, before
            :meth:`holds_lease` turns true (the caller loads its state there).
        on_leading: called right after it turns true (the caller starts its loops).
        clock: monotonic time (tests).

    Constructing it does no I/O; :meth:`run` is the election loop.

    """

    def __init__(
        self,
        metalog: MetaLog,
        holder: Callable[[], str],
        ttl_s: float,
        stopping: threading.Event,
        on_lead: Callable[[Lease], None],
        on_leading: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metalog = metalog
        self.holder = holder
        self.ttl_s = ttl_s
        self.stopping = stopping
        self.on_lead = on_lead
        self.on_leading = on_leading
        self.clock = clock
        #: the lease while leading (its epoch is the fencing token every write carries)
        self.lease: Lease | None = None
        self.epoch = 0
        #: leadership is certain until this monotonic time (renewed well inside the lease)
        self.leads_until = 0.0
        #: set when another coordinator took the lease: this one steps down (exits)
        self.deposed = False
        #: actions refused while the lease was in doubt (the fencing counter's share here)
        self.refused = 0
        #: set (to the one-line error) when the app's metadata in Redis was found lost
        self.lost: str | None = None
        self.leading = threading.Event()

    def holds_lease(self) -> bool:
        """Whether this coordinator took the lease and was not deposed (it may be in doubt)."""
        return self.lease is not None and not self.deposed and self.lost is None

    def leads(self) -> bool:
        """Whether this coordinator may act as the leader right now.

        True only while its last lease renewal is recent enough that no other coordinator
        can have taken the lease (a process that was paused finds this out on waking,
        before it seals or grants anything).
        """
        return (
            self.lease is not None
            and not self.deposed
            and self.lost is None
            and self.clock() < self.leads_until
        )

    def answers(self) -> bool:
        """Whether workers and clients should still be answered as by the leader.

        True while :meth:`leads`, and on through the margin after it: until the lease could
        have expired in Redis, no other coordinator can have taken it, so a Redis blip
        shorter than the lease unroutes nothing (acting stays refused by
        :meth:`may_act`). Past that, a leader cut off from Redis answers ``not leader``
        and reports not ready, so workers move to a standby that took the lease.
        """
        return (
            self.lease is not None
            and not self.deposed
            and self.lost is None
            and self.clock() < self.leads_until + LEASE_MARGIN_S
        )

    def may_act(self, what: str) -> bool:
        """:meth:`leads`, counting (metric, log) what a coordinator without it refused.

        A leader paused past its lease (or cut off from Redis) wakes up with its threads
        mid-loop: this check is what stops them before they act.
        """
        if self.leads():
            return True
        if self.lease is not None:
            self.refused += 1
            metrics.FENCED.labels(role="coordinator").inc()
            if self.refused == 1:
                log.warning("lease in doubt (epoch %d): refusing to %s", self.epoch, what)
        return False

    def run(self) -> None:
        """The ``election`` thread: take the lease when free, renew it until stopped.

        A standby retries every :data:`LEASE_RETRY_S`; the leader renews every quarter of
        the lease and counts as leader until ``lease - LEASE_MARGIN_S`` after the start of
        its last successful renewal. A renewal that finds another holder deposes it: it
        stops acting at once and the process exits (as client-go's leader election
        callers do), to come back as a standby.
        """
        import redis

        ttl = self.ttl_s
        warned = False
        while not self.stopping.is_set():
            t0 = self.clock()
            lease = None
            try:
                if self.lease is None:
                    lease = self.metalog.acquire_lease(self.holder(), ttl)
                    if lease is not None:
                        self.leads_until = t0 + ttl - LEASE_MARGIN_S
                        self.epoch = lease.epoch
                        self.on_lead(lease)
                        self.lease = lease  # last: handlers see a leader once it is loaded
                        metrics.LEADER.set(1)
                        self.on_leading()
                        self.leading.set()
                else:
                    if self.metalog.renew_lease(self.lease, ttl):
                        self.leads_until = t0 + ttl - LEASE_MARGIN_S
                    else:
                        self.step_down()
                        return
                if warned:
                    warned = False
                    log.warning("redis reachable again (leader lease)")
            except MetadataLostError as e:
                # the start check refused (on_lead), or a renewal found no epoch: fatal
                self.metadata_lost(str(e))
                if lease is not None and self.lease is None:  # refused before leading
                    with contextlib.suppress(Exception):
                        self.metalog.release_lease(lease)
                return
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if not warned:
                    warned = True
                    log.warning("redis unavailable for the leader lease: %s", e)
            except Exception:
                log.exception("leader election failed; retrying")
            self.stopping.wait(ttl / 4 if self.lease is not None else LEASE_RETRY_S)

    def metadata_lost(self, error: str) -> None:
        """The app's metadata in Redis is gone (or another run's): stop acting, exit.

        Called from any thread that meets :class:`MetadataLostError` (a fence, the start
        check, a worker's report); logs the one error line once and sets the stop event.
        Not a step-down: no other coordinator took over, and none could go on safely.
        """
        if self.lost is not None:
            return
        self.lost = error  # acts no more: leads() and holds_lease() turn false
        metrics.LEADER.set(0)
        log.error("%s", error)
        self.stopping.set()

    def step_down(self) -> None:
        """Another coordinator holds the lease: act no more, and stop the process."""
        if self.deposed or self.lost is not None:
            return
        self.deposed = True
        metrics.LEADER.set(0)
        leader = None
        with contextlib.suppress(Exception):
            leader = self.metalog.leader()
        log.error(
            "lost the leader lease (epoch %d) to %s; stepping down (%d actions refused "
            "since it lapsed)",
            self.epoch,
            leader.holder if leader else "another coordinator",
            self.refused,
        )
        self.stopping.set()

    def release(self) -> None:
        """Hand the lease over on a graceful stop (a standby takes over without waiting)."""
        lease, self.lease = self.lease, None
        if lease is not None and not self.deposed:
            with contextlib.suppress(Exception):
                self.metalog.release_lease(lease)
        metrics.LEADER.set(0)
