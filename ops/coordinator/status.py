"""Status: what ``dstream status`` and ``GET /api/status`` show of a coordinator."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from engine.scheduler import Scheduler
from ops.coordinator.completion import Completion
from ops.coordinator.leadership import LeaderElection
from ops.coordinator.membership import Membership
from ops.coordinator.receivers import ReceiverTracker


def standby_status(app_id: str, holder: str, election: LeaderElection) -> dict[str, Any]:
    """What a coordinator that does not lead can tell: who does (asks the metadata log)."""
    leader = None
    with contextlib.suppress(Exception):
        leader = election.metalog.leader()
    return {
        "app": app_id,
        "role": "deposed" if election.deposed else "standby",
        "coordinator": holder,
        "leader": leader.holder if leader else None,
        "leader_epoch": leader.epoch if leader else None,
        "epoch": election.epoch,
    }


class LeaderStatus:
    """The leader's view of batches, workers and receivers; read with the lock held.

    Args:
        first: the app's first batch; *interval_ms* its batch interval.
        next_batch: the batch the clock cuts next (asked when the status is built).
        rate_cap: the rate controller's cap (None: the workers' own).
        http_port: the coordinator's HTTP port (None before it serves).

    """

    def __init__(
        self,
        *,
        app_id: str,
        holder: str,
        epoch: int,
        first: int,
        interval_ms: int,
        scheduler: Scheduler,
        membership: Membership,
        receivers: ReceiverTracker,
        completion: Completion,
        next_batch: Any,
        rate_cap: Any,
        http_port: Any,
    ) -> None:
        self.app_id = app_id
        self.holder = holder
        self.epoch = epoch
        self.first = first
        self.interval_ms = interval_ms
        self.scheduler = scheduler
        self.membership = membership
        self.receivers = receivers
        self.completion = completion
        self.next_batch = next_batch
        self.rate_cap = rate_cap
        self.http_port = http_port

    def build(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "app": self.app_id,
            "role": "leader",
            "coordinator": self.holder,
            "epoch": self.epoch,
            "next_batch": self.next_batch(),
            "pending": sorted(s.batches),
            "batches": self.completion.history_status(),
            "workers": self.membership.status(time.monotonic()),
            "under_replicated_blocks": self.receivers.under_replicated,
            "oldest_pending": s.describe_batch(min(s.batches)) if s.batches else [],
            "interval_ms": self.interval_ms,
            "first_time_ms": self.receivers.times.get(self.first),
            "recovering": self.completion.recovering is not None,
            "rate_cap": self.rate_cap(),
            "receivers": self.receivers.status(self.membership.lag),
            "stats": vars(s.stats),
            "http_port": self.http_port(),
        }
