"""Tables of a fresh app: every table topic is read to its end before the first batch.

A Kafka Streams app restores its KTables before it processes a record; a fresh dstream app
does the same. When a leader takes over an app that logged no batch yet, it resolves the
end offset of every table topic partition once (kept in the metadata log, so a leader that
takes over before the first batch uses the same ones). The partitions are assigned with
that end as their ``load_until``: the receiver ignores the per-partition record cap below
it, and the batch clock cuts the app's first batch only once every receiver got there. So
the first batch's blocks hold the whole table as it was at start, and its joins see it.

Pure decisions, unit-tested without a broker or a clock:

* :func:`table_partitions` - the input partitions of the app's Kafka tables;
* :func:`load_targets` - which of them get a load target (those with records to read);
* :class:`LoadWatch` - whether the load is done, slow (a WARNING), or failed.

The thin I/O is :class:`TableLoader` (the batch clock's ``before_first_cut`` hook), which
asks the owning workers (``await_load``) until their receivers report every target reached.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ops import protocol as wire
from ops.coordinator.membership import CALL_TIMEOUT_S, Membership
from ops.coordinator.receivers import ReceiverTracker

__all__ = [
    "LOAD_POLL_S",
    "LOAD_TIMEOUT_S",
    "STALL_WARN_S",
    "LoadWatch",
    "TableLoader",
    "Verdict",
    "load_targets",
    "table_partitions",
]

log = logging.getLogger("dstream.coordinator")

Key = tuple[int, int]

#: How long one ``await_load`` call waits on the worker: it answers as soon as its table
#: partitions are loaded, else after this long with their positions (well under the RPC
#: timeout, so a slow load is never mistaken for a dead worker).
LOAD_POLL_S = 1.0
#: The load made no progress for this long: a WARNING naming each partition, its position
#: and its target (then again every this long).
STALL_WARN_S = 10.0
#: The load made no progress for this long: the app fails with an ERROR rather than start
#: with a partial table. Kafka Streams' ``task.timeout.ms`` default (5 minutes), after
#: which its stream thread gives up on a task that cannot make progress.
LOAD_TIMEOUT_S = 300.0


def table_partitions(
    nodes: Sequence[Any], layout: Mapping[int, list[tuple[str, int]]]
) -> dict[Key, tuple[str, int]]:
    """``(topic, partition)`` of every input partition of a table's Kafka source."""
    out: dict[Key, tuple[str, int]] = {}
    for node, tps in layout.items():
        args = nodes[node].args
        if args.get("source") == "kafka" and args.get("table"):
            for index, tp in enumerate(tps):
                out[(node, index)] = tp
    return out


def load_targets(ends: Mapping[Key, int], positions: Mapping[Key, int]) -> dict[Key, int]:
    """The load target of each table partition that has records to read before its end.

    *ends*: each partition's end offset at the app's first start; *positions*: where it
    starts (its earliest offset). An empty partition needs no wait.
    """
    return {k: end for k, end in sorted(ends.items()) if positions.get(k, 0) < end}


class Verdict(Enum):
    """What :meth:`LoadWatch.observe` decided."""

    LOADED = "loaded"  # every partition reached its target: cut the first batch
    LOADING = "loading"  # keep waiting
    STALLED = "stalled"  # keep waiting, and warn: no progress for STALL_WARN_S
    FAILED = "failed"  # no progress for LOAD_TIMEOUT_S: fail the app


@dataclass
class LoadWatch:
    """Progress of the table load, from the positions the receivers report.

    Args:
        targets: the load target per table partition.
        started: when the load started (seconds, any monotonic clock).

    """

    targets: dict[Key, int]
    started: float
    timeout_s: float = LOAD_TIMEOUT_S
    warn_s: float = STALL_WARN_S
    #: last reported position per partition (None: not known)
    positions: dict[Key, int | None] = field(default_factory=dict)
    progress_at: float = 0.0
    warned_at: float = 0.0

    def __post_init__(self) -> None:
        self.progress_at = self.warned_at = self.started

    def observe(self, positions: Mapping[Key, int | None], now: float) -> Verdict:
        """Take the latest reported positions (None: the owner did not say); decide.

        Progress is any partition's position moving forward (or becoming known); a
        partition reassigned to another worker starts again from its first offset.
        """
        moved = False
        for key in self.targets:
            pos = positions.get(key)
            before = self.positions.get(key)
            if pos is not None and (before is None or pos > before):
                moved = True
            self.positions[key] = pos
        if not self.pending():
            return Verdict.LOADED
        if moved:
            self.progress_at = self.warned_at = now
            return Verdict.LOADING
        if now - self.progress_at >= self.timeout_s:
            return Verdict.FAILED
        if now - self.warned_at >= self.warn_s:
            self.warned_at = now
            return Verdict.STALLED
        return Verdict.LOADING

    def pending(self) -> list[Key]:
        """The partitions not (known to be) at their target yet."""
        out = []
        for key, target in sorted(self.targets.items()):
            pos = self.positions.get(key)
            if pos is None or pos < target:
                out.append(key)
        return out

    def describe(self, layout: Mapping[int, list[tuple[str, int]]]) -> str:
        """``topic[p] at offset x of y`` for each pending partition (logs)."""
        parts = []
        for node, index in self.pending():
            topic, part = layout[node][index]
            pos = self.positions.get((node, index))
            at = "position unknown" if pos is None else f"at offset {pos}"
            parts.append(f"{topic}[{part}] {at} of {self.targets[(node, index)]}")
        return ", ".join(parts)


class TableLoader:
    """Waits, before a fresh app's first batch, until every table partition is loaded.

    Args:
        targets: the load target per table partition (already set on *receivers*).
        layout: the input partitions of every source node.
        send_assignments: sends the partition assignment again (the batch clock's).
        fail_app: fails the app with an error message.
        The others are the leader's roles, pool, lock and stop event.

    """

    def __init__(
        self,
        *,
        targets: dict[Key, int],
        layout: Mapping[int, list[tuple[str, int]]],
        receivers: ReceiverTracker,
        membership: Membership,
        send_assignments: Callable[[], None],
        io: Executor,
        lock: threading.RLock,
        stopping: threading.Event,
        fail_app: Callable[[str], None],
    ) -> None:
        self.targets = targets
        self.layout = layout
        self.receivers = receivers
        self.membership = membership
        self.send_assignments = send_assignments
        self.io = io
        self.lock = lock
        self.stopping = stopping
        self.fail_app = fail_app

    def wait(self) -> bool:
        """Block until every table partition is loaded; False when stopped or failed.

        Called on the batch-clock thread after the first assignment was sent. A worker
        that joins or is lost meanwhile makes the partitions be assigned again (a moved
        partition is read again from its first offset by its new owner).
        """
        start = time.monotonic()
        with self.lock:
            first = {k: self.receivers.positions.get(k, 0) for k in self.targets}
        total = sum(t - first[k] for k, t in self.targets.items())
        log.info(
            "loading %d table partitions up to their end offsets (%d offsets) before the "
            "first batch",
            len(self.targets),
            total,
        )
        watch = LoadWatch(dict(self.targets), start)
        while not self.stopping.is_set():
            began = time.monotonic()
            try:
                with self.lock:
                    resend = self.receivers.dirty
                if resend:
                    self.send_assignments()
                positions = self.ask()
            except Exception:
                if self.stopping.is_set():
                    return False  # stopping: the I/O pool is already shut down
                log.exception("asking the workers about the table load failed")
                positions = {}
            verdict = watch.observe(positions, time.monotonic())
            if verdict is Verdict.LOADED:
                log.info(
                    "tables loaded: %d offsets in %.2f s",
                    total,
                    time.monotonic() - start,
                )
                return True
            if verdict is Verdict.STALLED:
                log.warning(
                    "table load made no progress for %.0f s (the first batch waits for it): %s",
                    time.monotonic() - watch.progress_at,
                    watch.describe(self.layout),
                )
            elif verdict is Verdict.FAILED:
                msg = (
                    f"table load made no progress for {LOAD_TIMEOUT_S:.0f} s: "
                    f"{watch.describe(self.layout)}; Kafka does not deliver these partitions "
                    "(check the brokers and the topics), so the app stops instead of "
                    "starting with a partial table"
                )
                log.error("%s", msg)
                self.fail_app(msg)
                return False
            # a failed call answers at once: do not spin on it
            self.stopping.wait(max(0.0, 0.1 - (time.monotonic() - began)))
        return False

    def ask(self) -> dict[Key, int | None]:
        """Each target partition's position as its owner reports it (None: unknown).

        A partition its owner does not read with this target (the assignment did not
        reach it, or it restarted) is assigned again on the next round.
        """
        with self.lock:
            owners: dict[str, list[Key]] = {}
            for key in self.targets:
                wid = self.receivers.assignment.get(key)
                if wid is not None:
                    owners.setdefault(wid, []).append(key)
            clients = {wid: w.client for wid in owners if (w := self.membership.workers.get(wid))}
        calls: dict[str, Future[Any]] = {
            wid: self.io.submit(c.send, wire.AwaitLoad(LOAD_POLL_S), LOAD_POLL_S + CALL_TIMEOUT_S)
            for wid, c in clients.items()
        }
        positions: dict[Key, int | None] = dict.fromkeys(self.targets)
        for wid, f in calls.items():
            try:
                answer = [wire.TableLoad.from_wire(t) for t in f.result()]
            except Exception as e:
                log.debug("await_load on %s failed: %s", wid, e)
                continue
            got = {(t.topic, t.partition): t for t in answer}
            for key in owners[wid]:
                t = got.get(self.layout[key[0]][key[1]])
                if t is None or t.until != self.targets[key]:
                    with self.lock:
                        self.receivers.dirty = True
                    continue
                positions[key] = t.position
        if not calls:
            self.stopping.wait(LOAD_POLL_S)
        return positions
