"""Receiver tracking: where each input partition is read, and what each batch read.

:class:`ReceiverTracker` owns the input side of the coordinator's metadata, as Spark's
``ReceiverTracker`` and ``InputInfoTracker`` do: the next offset of every input partition
(*positions*), which worker reads it (*assignment*), and every batch's offset ranges and
batch time (the lineage a lost input block is re-read from, pruned once no checkpoint
needs it). Pure bookkeeping, called with the coordinator's lock held; Kafka is asked only
by :func:`start_positions`, before the tracker is built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from engine.plan import block_batch, block_node, block_part, input_block_id
from ops.protocol import Assign, BlockReport, PartitionAssignment
from state.metalog import OffsetRange

log = logging.getLogger("dstream.coordinator")

#: (source node, partition index) -> (topic, Kafka partition); topic "" for a queue source
Layout = Mapping[int, list[tuple[str, int]]]
Key = tuple[int, int]


def _input_key(bid: str) -> Key:
    """(source node, partition index) of input block *bid* (``in/{node}/{batch}/{index}``).

    One split instead of :func:`block_node` and :func:`block_part` (two): called per
    reported block, thousands of times a batch in a large fleet.
    """
    parts = bid.split("/")
    return int(parts[1]), int(parts[-1])


def positions_after(ranges: Mapping[int, Mapping[str, OffsetRange]]) -> dict[Key, int]:
    """Next offset per (source node, partition index) after the logged batches."""
    pos: dict[Key, int] = {}
    for b in sorted(ranges):
        for bid, rng in ranges[b].items():
            pos[(block_node(bid), block_part(bid))] = rng.until
    return pos


def start_positions(
    layout: Layout,
    logged: dict[Key, int],
    first_offsets: Callable[[list[tuple[int, int, str, int]]], dict[Key, int]],
) -> dict[Key, int]:
    """Next offset to read per input partition: after the log, else where the source starts.

    *first_offsets* is asked once, for every Kafka partition the log does not cover, as
    ``(node, index, topic, partition)``; it answers their start (earliest or latest
    offset, as the source asks). A queue source starts at 0.
    """
    pos = dict(logged)
    need = [
        (node, i, topic, part)
        for node, tps in layout.items()
        for i, (topic, part) in enumerate(tps)
        if (node, i) not in pos and topic
    ]
    if need:
        pos.update(first_offsets(need))
    for node, tps in layout.items():
        for index, _tp in enumerate(tps):
            pos.setdefault((node, index), 0)
    return pos


class ReceiverTracker:
    """Positions, partition assignment and offset ranges of the app's input.

    Args:
        layout: the input partitions of every source node.
        positions: next offset per input partition (:func:`start_positions`).
        logged: offset ranges of the batches an earlier leader logged.
        times: their batch times.
        max_records: the configured per-partition cap sent with assignments (None: none).

    """

    def __init__(
        self,
        layout: Layout,
        positions: dict[Key, int],
        logged: dict[int, dict[str, OffsetRange]] | None = None,
        times: dict[int, int] | None = None,
        max_records: int | None = None,
    ) -> None:
        self.layout = layout
        self.positions = positions
        #: offset ranges of batches whose input may still be re-read (lineage)
        self.ranges: dict[int, dict[str, OffsetRange]] = dict(logged or {})
        self.times: dict[int, int] = dict(times or {})
        self.max_records = max_records
        #: (node, index) -> the worker reading it
        self.assignment: dict[Key, str] = {}
        #: set when membership changed: the next seal sends assignments first
        self.dirty = True
        #: blocks reported with fewer than two holders while two workers were live
        self.under_replicated = 0
        #: a bounded run's stop offset per input partition (sent with the assignments)
        self.stops: dict[Key, int] = {}
        #: a fresh app's table load targets (sent with the assignments until a batch is logged)
        self.loads: dict[Key, int] = {}

    # -- assignment ------------------------------------------------------------------------
    def assign(self, workers: Iterable[str]) -> dict[str, Assign]:
        """Balanced round-robin of input partitions over *workers*; kept where possible.

        Returns the ``assign`` message of every worker (each worker's whole set, and its
        replica peers: the next workers in sorted order). Deterministic. A table
        partition's load target goes along only while no batch is logged.
        """
        ws = sorted(workers)
        if not ws:
            return {}
        if self.loads and self.ranges:  # the first batch is logged: its blocks loaded them
            self.loads = {}
        parts = sorted(self.positions)
        new: dict[Key, str] = {}
        load = dict.fromkeys(ws, 0)
        quota = -(-len(parts) // len(ws))
        for key in parts:  # keep current owners up to their quota (no needless moves)
            owner = self.assignment.get(key)
            if owner in load and load[owner] < quota:
                new[key] = owner
                load[owner] += 1
        for key in parts:
            if key not in new:
                owner = min(ws, key=lambda w: (load[w], w))
                new[key] = owner
                load[owner] += 1
        self.assignment = new
        per: dict[str, list[PartitionAssignment]] = {w: [] for w in ws}
        for (node, idx), owner in new.items():
            topic, part = self.layout[node][idx]
            per[owner].append(
                PartitionAssignment(
                    node,
                    idx,
                    topic,
                    part,
                    self.positions[(node, idx)],
                    self.stops.get((node, idx)),
                    self.loads.get((node, idx)),
                )
            )
        self.dirty = False
        return {
            w: Assign(per[w], ws[i + 1 :] + ws[:i], self.max_records or None)
            for i, w in enumerate(ws)
        }

    # -- batches ---------------------------------------------------------------------------
    def continuing(self, reports: list[BlockReport]) -> list[BlockReport]:
        """The seal reports that start at their partition's position; the others dropped.

        A worker advances its receiver at every seal, whether or not the coordinator heard
        the answer; when a seal answer is lost (a timeout, a dropped connection) the
        partition gets an empty range for that batch, and the worker's next report starts
        past the logged position. Taking it would leave the offsets between out of every
        logged range: it is dropped instead (the partition gets an empty range again) and
        the partition is assigned anew from the logged position, which makes the worker
        read it again from there (``Receivers.assign`` restarts a partition whose start
        changed).
        """
        ok: list[BlockReport] = []
        for r in reports:
            key = _input_key(r.block)
            pos = self.positions.get(key)
            if pos is None or r.range.start == pos:
                ok.append(r)
                continue
            log.warning(
                "seal report %s starts at offset %d but the partition's logged position is "
                "%d (an earlier seal answer was lost): reading it again from %d",
                r.block,
                r.range.start,
                pos,
                pos,
            )
            self.dirty = True
        return ok

    def record_batch(
        self, b: int, time_ms: int, reports: list[BlockReport]
    ) -> dict[str, OffsetRange]:
        """Batch *b*'s offset ranges from the seal *reports*, remembered as its lineage.

        A partition no worker reported (its owner died or was moved) gets an empty range
        at its position: its records go to the next block of its next owner.
        """
        ranges = {r.block: r.range for r in reports}
        for (node, idx), pos in self.positions.items():
            bid = input_block_id(node, b, idx)
            if bid not in ranges:
                topic, part = self.layout[node][idx]
                ranges[bid] = OffsetRange(topic, part, pos, pos, 0)
        self.ranges[b] = ranges
        self.times[b] = time_ms
        return ranges

    def advance(self, reports: list[BlockReport]) -> None:
        """The reported blocks are logged: their partitions continue after them."""
        positions = self.positions
        for r in reports:
            positions[_input_key(r.block)] = r.range.until

    def range_of(self, bid: str) -> OffsetRange | None:
        """The logged offset range of input block *bid* (None: not logged, or pruned)."""
        return self.ranges.get(block_batch(bid), {}).get(bid)

    def input_ranges(self, block_ids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """``(start, until)`` of each input block among *block_ids* that has a logged range."""
        out = {}
        for bid in block_ids:
            if bid.startswith("in/"):
                rng = self.range_of(bid)
                if rng is not None:
                    out[bid] = (rng.start, rng.until)
        return out

    def prune(self, keep_from: int) -> None:
        """Forget ranges and times of batches before *keep_from* (lineage no longer needed)."""
        for x in [x for x in self.ranges if x < keep_from]:
            del self.ranges[x]
            self.times.pop(x, None)

    def status(self, lag: Callable[[str, tuple[str, int]], int | None]) -> list[dict[str, Any]]:
        return [
            {
                "node": n,
                "index": i,
                "topic": self.layout[n][i][0],
                "partition": self.layout[n][i][1],
                "owner": o,
                "position": self.positions.get((n, i)),
                "lag": lag(o, self.layout[n][i]),
            }
            for (n, i), o in sorted(self.assignment.items())
        ]
