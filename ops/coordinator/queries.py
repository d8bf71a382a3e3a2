"""Queries on live state: the leader answers ``dstream query`` and ``GET /api/state/...``.

A query names a stream (``.name("counts")`` in the app) and reads its state as of one
completed batch: the last batch every batch up to which completed (for a window, the last
batch at or before it where the window ended). Each partition is read at that batch by a
worker holding it (:meth:`ops.worker.Worker._query_part`), and the answer carries the batch
number and time. The blocks read stay until the next batch (window) completes
(``Plan.keep``); a block freed meanwhile makes the query start over at the new batch.

When a partition cannot be read (its holder was lost and the state is being rebuilt), the
whole answer comes from the latest checkpoint instead, when every partition has one at the
same batch; otherwise the query waits for the rebuild, up to :data:`WAIT_S`. An answer is
never a mix of batches, nor a partly rebuilt state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from engine.errors import RpcError
from engine.graph import Node
from engine.plan import Plan
from engine.query import (
    QueryError,
    check_limit,
    checkpoint_items,
    find_stream,
    key_text,
    merge,
    query_kind,
    select,
)
from engine.scheduler import Scheduler
from ops import protocol as wire
from ops.coordinator.membership import Membership
from state.checkpoint import CheckpointMissing

log = logging.getLogger("dstream.coordinator")

#: How long a query waits for a state being rebuilt (a lost worker's partitions are
#: recomputed within a few batches) before it answers 503 "ask again".
WAIT_S = 10.0
#: Pause between two tries while waiting.
RETRY_S = 0.2
#: A worker answers a partition within this (a state partition is read in memory).
PART_TIMEOUT_S = 5.0


class CheckpointReader(Protocol):
    def read_items(self, node: int, part: int, batch: int) -> list[Any]: ...


class StateQueries:
    """Answers queries of the app's named streams; see the module docstring.

    Args:
        app_id: the app served (a query for another app is refused).
        scheduler: block locations, the batch done up to, checkpoints in force.
        membership: the live workers and their clients.
        checkpoints: the checkpoint store (Redis), read when a partition is lost.
        times: batch times in ms by batch (the receiver tracker's).
        lock: the coordinator's lock (held only to read the scheduler's state).
        first: the app's first batch.

    """

    def __init__(
        self,
        *,
        app_id: str,
        scheduler: Scheduler,
        membership: Membership,
        checkpoints: CheckpointReader,
        times: Callable[[int], int | None],
        lock: threading.RLock,
        first: int,
        interval_ms: int,
        wait_s: float = WAIT_S,
    ) -> None:
        self.app_id = app_id
        self.scheduler = scheduler
        self.plan: Plan = scheduler.plan
        self.membership = membership
        self.checkpoints = checkpoints
        self.times = times
        self.lock = lock
        self.first = first
        self.interval_ms = interval_ms
        self.wait_s = wait_s
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="query")

    def answer(self, q: wire.Query) -> dict[str, Any]:
        """The selected entries of *q.stream* as of a completed batch (see the module).

        Raises:
            QueryError: another app, an unknown or stateless stream, a bad limit, no batch
                completed yet, or a state still being rebuilt after :data:`WAIT_S`.

        """
        if q.app != self.app_id:
            msg = f"this coordinator runs app {self.app_id!r}, not {q.app!r}"
            raise QueryError(msg, 404)
        node = find_stream(self.plan.nodes, q.stream)
        limit = check_limit(q.limit)
        deadline = time.monotonic() + self.wait_s
        while True:
            got, b = self._from_workers(node, q, limit)
            if got is None:
                with self.lock:
                    moved = self._batch(node) != b
                if moved:  # a block was freed as the next batch completed: read that one
                    continue
                got = self._from_checkpoint(node, q, limit)
            if got is not None:
                return got
            if time.monotonic() >= deadline:
                msg = (
                    f"the state of {q.stream!r} is being rebuilt after a worker loss and has "
                    "no complete checkpoint; ask again in a few seconds"
                )
                raise QueryError(msg, 503)
            time.sleep(RETRY_S)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- reading ---------------------------------------------------------------------------
    def _batch(self, node: Node) -> int:
        """The batch a query of *node* reads (lock held)."""
        done = self.scheduler.done_upto()
        if done < self.first:
            msg = "no batch of the app has completed yet; ask again after the first one"
            raise QueryError(msg, 503)
        b = done
        while b >= self.first and not self.plan.emits(node.id, b):
            b -= 1
        if b < self.first:
            msg = f"{node.name}: no window has completed yet; ask again after the first one"
            raise QueryError(msg, 503)
        return b

    def _from_workers(
        self, node: Node, q: wire.Query, limit: int
    ) -> tuple[dict[str, Any] | None, int]:
        """The answer read from the workers' blocks (None: not all held), and its batch."""
        with self.lock:
            b = self._batch(node)
            clients = {w: info.client for w, info in self.membership.workers.items()}
            plan_parts: list[tuple[wire.QueryPartition, list[str]]] = []
            for p in range(self.plan.nparts[node.id]):
                deps = [bid for bid, _ in self.plan.deps(node, b, p, self.first)]
                locs = {bid: sorted(self.scheduler.holders(bid)) for bid in deps}
                if any(not holders for holders in locs.values()):
                    return None, b  # lost, being rebuilt
                held = {w for hs in locs.values() for w in hs if w in clients}
                order = sorted(
                    clients, key=lambda w: (-sum(w in hs for hs in locs.values()), w not in held, w)
                )
                if not order:
                    return None, b
                msg = wire.QueryPartition(node.id, b, p, locs, list(q.keys), q.prefix, limit)
                plan_parts.append((msg, order))
        futures = [self._pool.submit(self._read_part, clients, m, o) for m, o in plan_parts]
        parts = [f.result() for f in futures]
        if any(r is None for r in parts):
            return None, b
        return self._reply(node, q, limit, b, "workers", [r for r in parts if r is not None]), b

    def _read_part(
        self, clients: dict[str, Any], msg: wire.QueryPartition, order: list[str]
    ) -> tuple[list[Any], bool] | None:
        for w in order[:3]:
            try:
                r = clients[w].call("query_part", msg.to_wire(), PART_TIMEOUT_S)
            except RpcError as e:  # gone, freed meanwhile, or lost: another holder, or retry
                log.debug("query of node %d part %d at %s failed: %s", msg.node, msg.part, w, e)
                continue
            return list(r["items"]), bool(r["more"])
        return None

    def _from_checkpoint(self, node: Node, q: wire.Query, limit: int) -> dict[str, Any] | None:
        """The answer read from the checkpoints in force, when all are of one batch."""
        nparts = self.plan.nparts[node.id]
        with self.lock:
            self._batch(node)  # no batch done: the same error as from the workers
            ck = {self.scheduler.checkpoints.get((node.id, p)) for p in range(nparts)}
        if len(ck) != 1 or None in ck:
            return None
        (cb,) = ck
        assert cb is not None
        kind = "window" if node.kind == "window" else "state"
        parts = []
        for p in range(nparts):
            try:
                items = checkpoint_items(node, self.checkpoints.read_items(node.id, p, cb))
            except CheckpointMissing:  # a newer one took effect meanwhile: try again
                return None
            parts.append(select(kind, items, q.keys, q.prefix, limit))
        return self._reply(node, q, limit, cb, "checkpoint", parts)

    def _reply(
        self,
        node: Node,
        q: wire.Query,
        limit: int,
        b: int,
        source: str,
        parts: list[tuple[list[Any], bool]],
    ) -> dict[str, Any]:
        kind = query_kind(node) or ""
        items, more = merge("window" if kind == "window" else "state", parts, q.keys, limit)
        t = self.times(b)
        found = {key_text(e[0]) for e in items} if kind != "window" else set(q.keys)
        return {
            "app": self.app_id,
            "stream": q.stream,
            "kind": kind,
            "batch": b,
            "batch_time_ms": t if t is not None else b * self.interval_ms,
            "source": source,
            "items": items,
            "more": more,
            "missing": [k for k in q.keys if k not in found],
        }
