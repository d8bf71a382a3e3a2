"""Bounded runs and catch-up: when the batch clock cuts the next batch, and when it is done.

Pure decisions, unit-tested without a clock or a broker (the thin I/O is
:func:`kafka_offsets`, asked once when a leader takes over):

* :func:`source_bounds` - which input partitions are bounded, and by what
  (``kafka_stream(stop=)`` or ``--until`` for every Kafka source);
* :class:`Pacer` - the batch clock's pace: batch ``k`` is stamped
  ``start + k * interval`` whatever happens, and is cut at that wall time, or earlier
  while the input is behind (a backlog, a bounded run): as soon as the previous batch
  completed. The time saved is kept (:attr:`Pacer.ahead`) so that a caught-up app then
  follows the clock again, one batch per interval, its batch times still evenly spaced;
* :func:`is_behind` - whether the input is behind;
* :func:`reached` - whether a bounded run read every partition up to its stop offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.bounds import Bound
from state.metalog import OffsetRange

__all__ = [
    "EMPTY_GAP_S",
    "MAX_IN_FLIGHT",
    "POLL_S",
    "Pacer",
    "decode_stops",
    "encode_stops",
    "is_behind",
    "kafka_offsets",
    "reached",
    "source_bounds",
]

Key = tuple[int, int]

#: A batch is cut early only while fewer than this many batches are in flight: the next
#: batch's first stage overlaps the last stage and commit of the one before (timestep
#: pipelining), and no queue of batches builds up.
MAX_IN_FLIGHT = 2
#: After an empty batch, an early cut waits at least this long: the receivers are still
#: fetching (at start), and a loop of empty batches would only cost seals and log writes.
EMPTY_GAP_S = 0.05
#: While behind, the clock re-checks at least this often (a batch completion wakes it
#: at once; this bounds the wait on a missed wake-up).
POLL_S = 0.05


def source_bounds(
    nodes: Sequence[Any], layout: Mapping[int, list[tuple[str, int]]], until: Bound | None
) -> dict[Key, tuple[str, int, Bound]]:
    """The stop bound of every bounded input partition: ``(topic, partition, bound)``.

    *until* (``dstream run --until``) bounds every Kafka source and wins over a source's
    own ``stop``; queue sources are never bounded.
    """
    out: dict[Key, tuple[str, int, Bound]] = {}
    for node, tps in layout.items():
        args = nodes[node].args
        if args.get("source") != "kafka":
            continue
        bound = until or args.get("stop_bound")
        if bound is None:
            continue
        for index, (topic, part) in enumerate(tps):
            out[(node, index)] = (topic, part, bound)
    return out


def encode_stops(stops: Mapping[Key, int]) -> dict[str, int]:
    """Stop offsets as the metadata log keeps them (``"node/index"``)."""
    return {f"{n}/{i}": off for (n, i), off in sorted(stops.items())}


def decode_stops(raw: Mapping[str, int]) -> dict[Key, int]:
    """Inverse of :func:`encode_stops`."""
    out: dict[Key, int] = {}
    for k, off in raw.items():
        n, i = k.split("/")
        out[(int(n), int(i))] = int(off)
    return out


def reached(
    positions: Mapping[Key, int], stops: Mapping[Key, int], layout_keys: Iterable[Key]
) -> bool:
    """Whether every input partition is bounded and logged up to its stop offset.

    A partition without a stop (an unbounded source) never lets the run finish.
    """
    for key in layout_keys:
        stop = stops.get(key)
        if stop is None or positions.get(key, 0) < stop:
            return False
    return True


def is_behind(
    *,
    positions: Mapping[Key, int],
    stops: Mapping[Key, int],
    last: Mapping[str, OffsetRange],
    cap: int | None,
    lag: int,
) -> bool:
    """Whether the input is behind, so the next batch should not wait for the clock.

    Behind when a bounded partition has not reached its stop, when a partition of the
    last batch was cut at the cap (its records wait in Kafka), or when more records wait
    than the last batch held: a backlog. A steady stream's lag (the records of a fraction
    of an interval) is less than a batch, so a live app that kept up follows the clock;
    so does one whose last batch was empty (a reported lag is then stale).

    Args:
        positions: next offset per input partition (after the last logged batch).
        stops: a bounded run's stop offsets (empty: unbounded).
        last: the last batch's offset ranges.
        cap: the per-partition record cap the last batch was sealed with (None: none).
        lag: records the receivers reported not yet read (sum over partitions).

    """
    if any(positions.get(k, 0) < s for k, s in stops.items()):
        return True
    if cap and any(r.records >= cap for r in last.values()):
        return True
    held = sum(r.records for r in last.values())
    if last and not held:
        # the receivers had nothing to cut: the lag they reported (with their last
        # heartbeat) is stale, and cutting at once would only cut empty batches back to back
        return False
    return lag > held


@dataclass
class Pacer:
    """The pace of the batch clock (one per leader; times in seconds since the epoch).

    Args:
        interval_s: the batch interval.
        start: the wall time of this leader's batch ``k = 0``.

    """

    interval_s: float
    start: float
    #: seconds the cuts run ahead of their batch times (time saved by early cuts)
    ahead: float = 0.0

    def time_ms(self, k: int) -> int:
        """The batch time of this leader's *k*-th batch: evenly spaced, whatever the pace."""
        return int((self.start + k * self.interval_s) * 1000)

    def due(self, k: int) -> float:
        """The wall time the clock cuts batch *k* at when the input keeps up."""
        return self.start + k * self.interval_s - self.ahead

    def wait(
        self,
        k: int,
        now: float,
        *,
        behind: bool,
        in_flight: int,
        last_cut: float,
        last_records: int,
        last_took: float = 0.0,
    ) -> float:
        """Seconds to wait before cutting batch *k*; 0.0: cut it now.

        Cut when its time is due; or earlier, while *behind*: at once when no batch is in
        flight (after an empty batch, :data:`EMPTY_GAP_S` after the last cut), and with
        one in flight (up to :data:`MAX_IN_FLIGHT`) once half of *last_took* (the seal to
        completion time of the last completed batch) passed since the last cut, so two
        batches overlap by about half their time. An early cut moves every later due
        time forward by the time it saved.
        """
        due = self.due(k)
        if now >= due:
            return 0.0
        if behind:
            since = now - last_cut
            if in_flight == 0:
                ready = since >= (0.0 if last_records else EMPTY_GAP_S)
            else:
                ready = in_flight < MAX_IN_FLIGHT and last_took > 0 and since >= last_took / 2
            if ready:
                self.ahead += due - now
                return 0.0
            return min(due - now, POLL_S)
        return due - now


def kafka_offsets(
    consumer: Any, need: Iterable[tuple[Key, str, int, Bound]], timeout_s: float = 30.0
) -> dict[Key, int]:
    """Resolve bounds to offsets, one per partition (the I/O of a leader taking over).

    ``earliest``/``latest``/``end``: the low or high watermark; ``time``: the first offset
    stamped at or after the instant (``offsets_for_times``), or the high watermark when
    no record is that late.
    """
    from confluent_kafka import TopicPartition

    out: dict[Key, int] = {}
    timed: list[tuple[Key, TopicPartition]] = []
    marks: dict[Key, tuple[int, int]] = {}
    for key, topic, part, bound in need:
        lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=timeout_s)
        marks[key] = (lo, hi)
        if bound.kind == "earliest":
            out[key] = lo
        elif bound.kind in ("latest", "end"):
            out[key] = hi
        else:
            timed.append((key, TopicPartition(topic, part, bound.time_ms or 0)))
    while timed:
        # one request names a partition once (two sources may read the same topic)
        seen: set[tuple[str, int]] = set()
        now: list[tuple[Key, Any]] = []
        later: list[tuple[Key, Any]] = []
        for key, tp in timed:
            (later if (tp.topic, tp.partition) in seen else now).append((key, tp))
            seen.add((tp.topic, tp.partition))
        got = consumer.offsets_for_times([tp for _k, tp in now], timeout=timeout_s)
        answers = {(tp.topic, tp.partition): tp.offset for tp in got}
        for key, tp in now:
            lo, hi = marks[key]
            off = answers.get((tp.topic, tp.partition))
            out[key] = hi if off is None or off < 0 else max(lo, off)
        timed = later
    return out
