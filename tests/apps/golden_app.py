"""Golden app: one graph with a pipeline per DStream operator, all on one fleet.

Every case is ``(pipeline, inputs)``: ``pipeline(*streams)`` builds the case's output stream
from one ``queue_stream`` per input (a list of batches). ``build`` tags each case's records
with the case name (``(name, record)``) and writes the union of the cases of one slide to
one Kafka topic, ``GOLDEN_PREFIX + "slide1"`` or ``+ "slide2"`` (message key = JSON case
name, value = JSON record); it also adds the Redis cases (``to_redis`` set and hash).

Why two topics and not one per case: every Kafka output partition has its own
transactional producer on every worker that commits it (``init_transactions`` takes ~0.7 s
on the test broker), so ~80 per-case output partitions took the fleet ~30 s to warm up
and made the two workers fence each other's producers (see the test module).

The test (``tests/integration/test_fleet_golden.py``) runs this file on a real fleet and
compares every case per batch with the in-process engine and the reference runner, which
use the very same pipeline functions (imported from this module).

Run it by hand: ``GOLDEN_PREFIX=g- dstream run tests/apps/golden_app.py
--workers 2 --batch-interval 0.25`` (topics ``g-slide1`` and ``g-slide2`` must exist).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

from engine import TIMEOUT, DStream, StreamingContext

#: The batch interval the windows below are written for (seconds); the fleet must run
#: with it (``DSTREAM_BATCH_INTERVAL``).
INTERVAL = 0.25
#: Batches whose output the test compares: every input list is shorter, and the last
#: window and timeout tails end before it.
NUM_BATCHES = 10

Pipeline = Callable[..., DStream]
Batches = list[list[Any]]


def iv(n: int) -> float:
    """*n* batch intervals, in seconds."""
    return n * INTERVAL


# -- inputs ----------------------------------------------------------------------------------
NUMS: Batches = [[1, 2, 3, 4], [5], [], [6, 7, 8], [9, 10]]
WORDS: Batches = [["a b", "c"], [""], ["d d a"], [], ["b"]]
KV: Batches = [[("a", 1), ("b", 2), ("a", 3)], [("a", 3)], [], [("b", 5), ("c", 1)], [], []]
LEFT: Batches = [[("a", 1), ("b", 2), ("a", 3)], [("d", 4)], [], [("a", 7)]]
RIGHT: Batches = [[("a", "x"), ("c", "y")], [], [("e", "z")], [("a", "w"), ("a", "v")]]
THIRD: Batches = [[("b", 10)], [("d", 40)], [], [("f", 60)]]
SINGLE: Batches = [[1], [2], [3], [4], [], [5], [6]]
WINDOW_KV: Batches = [[("a", 1), ("b", 2)], [("a", 3)], [], [("b", 5)], [("a", 1)], [], []]
TRACK_IN: Batches = [
    [("a", 1), ("b", 2)],
    [("a", 3), ("c", 1)],
    [("b", 0)],
    [],
    [("b", 5), ("c", 2)],
    [],
    [],
]
UPDATE_IN: Batches = [[("a", 1), ("b", 2)], [("a", 3)], [], [("b", 5)], [("b", 1)], []]
HASH_IN: Batches = [
    [("a", 1), ("b", 2), ("c", 1)],
    [("a", 3), ("c", 0)],
    [],
    [("b", 5)],
    [("c", 4)],
    [("b", 0)],
]


# -- helper functions (module level: every process builds the same graph) ----------------------
def _sorted_values(kv: Any) -> Any:
    return kv[0], sorted(kv[1])


def _sorted_groups(kv: Any) -> Any:
    return kv[0], [sorted(g) for g in kv[1]]


def _sum_or_delete(values: list[int], old: int | None) -> int | None:
    """Sum of the values so far; a key without new values is deleted."""
    if not values:
        return None
    return (old or 0) + sum(values)


def _init(key: str, ev: int) -> int:
    return ev


def _update(key: str, state: int, ev: Any) -> Any:
    if ev is TIMEOUT:
        return f"final:{key}:{state}"
    if ev == 0:
        return None
    return state + ev


def _sum_delete_on_zero(values: list[int], old: int | None) -> int | None:
    """Sum of the values so far; a 0 among a batch's values deletes the key."""
    if 0 in values:
        return None
    return (old or 0) + sum(values)


def _nonzero(kv: Any) -> bool:
    return bool(kv[1] != 0)


# -- the cases ---------------------------------------------------------------------------------
CASES: dict[str, tuple[Pipeline, Sequence[Batches]]] = {
    # stateless
    "map": (lambda s: s.map(lambda x: x * 10), [NUMS]),
    "flat-map": (lambda s: s.flat_map(str.split), [WORDS]),
    "filter": (lambda s: s.filter(lambda x: x % 2 == 0), [NUMS]),
    "map-values": (lambda s: s.map_values(lambda v: v + 1), [KV]),
    "flat-map-values": (lambda s: s.flat_map_values(range), [KV]),
    "union": (lambda s, t: s.union(t), [NUMS, SINGLE]),
    "union3-reduce-by-key": (
        lambda s, t, u: s.union(t, u).reduce_by_key(operator.add),
        [LEFT, THIRD, KV],
    ),
    "repartition": (lambda s: s.repartition(3), [NUMS]),
    "repartition-reduce": (
        lambda s: s.repartition(3).map(lambda x: (x % 2, x)).reduce_by_key(operator.add),
        [NUMS],
    ),
    "count": (lambda s: s.count(), [NUMS]),
    "count-by-value": (lambda s: s.flat_map(str.split).count_by_value(), [WORDS]),
    "reduce": (lambda s: s.reduce(operator.add), [NUMS]),
    "reduce-by-key": (lambda s: s.reduce_by_key(operator.add), [KV]),
    "reduce-by-key-3-partitions": (
        lambda s: s.flat_map(str.split).map(lambda w: (w, 1)).reduce_by_key(operator.add, 3),
        [WORDS],
    ),
    "group-by-key": (lambda s: s.group_by_key().map(_sorted_values), [KV]),
    "join": (lambda s, t: s.join(t), [LEFT, RIGHT]),
    "left-outer-join": (lambda s, t: s.left_outer_join(t), [LEFT, RIGHT]),
    "right-outer-join": (lambda s, t: s.right_outer_join(t), [LEFT, RIGHT]),
    "full-outer-join": (lambda s, t: s.full_outer_join(t, num_partitions=3), [LEFT, RIGHT]),
    "cogroup": (lambda s, t, u: s.cogroup(t, u).map(_sorted_groups), [LEFT, RIGHT, THIRD]),
    "transform": (lambda s: s.transform(lambda recs: sorted(recs)[:2]), [NUMS]),
    "transform-with-time": (
        lambda s: s.transform(lambda t, recs: [(t, len(recs))]),
        [NUMS],
    ),
    # windows
    "window": (lambda s: s.window(iv(3), iv(1)), [SINGLE]),
    "window-slide": (lambda s: s.window(iv(4), iv(2)), [SINGLE]),
    "count-by-window": (lambda s: s.count_by_window(iv(3), iv(1)), [NUMS]),
    "reduce-by-window": (lambda s: s.reduce_by_window(operator.add, None, iv(2), iv(1)), [NUMS]),
    "reduce-by-window-inverse": (
        lambda s: s.reduce_by_window(operator.add, operator.sub, iv(2), iv(1)),
        [NUMS],
    ),
    "reduce-by-key-and-window": (
        lambda s: s.reduce_by_key_and_window(operator.add, window=iv(3), slide=iv(1)),
        [WINDOW_KV],
    ),
    "reduce-by-key-and-window-inverse": (
        lambda s: s.reduce_by_key_and_window(operator.add, operator.sub, iv(3), iv(1)),
        [WINDOW_KV],
    ),
    "reduce-by-key-and-window-inverse-filter": (
        lambda s: s.reduce_by_key_and_window(
            operator.add, operator.sub, iv(3), iv(1), filter_fn=_nonzero
        ),
        [WINDOW_KV],
    ),
    "reduce-by-key-and-window-slide": (
        lambda s: s.reduce_by_key_and_window(operator.add, operator.sub, iv(4), iv(2)),
        [WINDOW_KV],
    ),
    "count-by-value-and-window": (
        lambda s: s.flat_map(str.split).count_by_value_and_window(iv(2), iv(1)),
        [WORDS],
    ),
    # state
    "running-reduce": (lambda s: s.running_reduce(operator.add), [KV]),
    "running-reduce-snapshot": (lambda s: s.running_reduce(operator.add).snapshot(), [KV]),
    "running-reduce-over-window": (
        lambda s: s.window(iv(2), iv(2)).running_reduce(operator.add),
        [WINDOW_KV],
    ),
    "update-state-by-key": (lambda s: s.update_state_by_key(_sum_or_delete), [UPDATE_IN]),
    "update-state-by-key-snapshot": (
        lambda s: s.update_state_by_key(_sum_or_delete).snapshot(),
        [UPDATE_IN],
    ),
    "track-timeout": (lambda s: s.track(_init, _update, timeout=iv(2)), [TRACK_IN]),
    "track-snapshot": (lambda s: s.track(_init, _update, timeout=iv(2)).snapshot(), [TRACK_IN]),
}

# -- Redis cases: (pipeline, inputs); their final state is checked in Redis ------------------
#: ``to_redis(mode="set", key_pattern="count:{key}")``: running counts per key.
REDIS_SET: tuple[Pipeline, Sequence[Batches]] = (
    lambda s: s.running_reduce(operator.add),
    [KV],
)
#: ``to_redis(mode="hash", hash_name=...)``: update_state_by_key with deletions (HDEL).
REDIS_HASH: tuple[Pipeline, Sequence[Batches]] = (
    lambda s: s.update_state_by_key(_sum_delete_on_zero),
    [HASH_IN],
)
REDIS_KEY_PATTERN = "count:{key}"
REDIS_HASH_NAME = "states"


#: Cases whose output stream has a slide of two batches (all others slide every batch):
#: union needs streams of one slide, so they go to their own topic.
SLIDE_2 = frozenset(
    {"window-slide", "reduce-by-key-and-window-slide", "running-reduce-over-window"}
)


def topic_of(case: str, prefix: str) -> str:
    return prefix + ("slide2" if case in SLIDE_2 else "slide1")


def _streams(ssc: StreamingContext, inputs: Sequence[Batches]) -> list[DStream]:
    return [ssc.queue_stream(batches) for batches in inputs]


def _tagger(name: str) -> Callable[[Any], Any]:
    def tag(record: Any) -> Any:
        return name, record

    return tag


def build(ssc: StreamingContext) -> None:
    if abs(ssc.batch_interval - INTERVAL) > 1e-9:
        msg = f"golden_app is written for a {INTERVAL}s batch interval, got {ssc.batch_interval}s"
        raise ValueError(msg)
    prefix = os.environ.get("GOLDEN_PREFIX", "golden-")
    by_topic: dict[str, list[DStream]] = {}
    for name, (pipeline, inputs) in CASES.items():
        tagged = pipeline(*_streams(ssc, inputs)).map(_tagger(name))
        by_topic.setdefault(topic_of(name, prefix), []).append(tagged)
    for topic, streams in by_topic.items():
        streams[0].union(*streams[1:]).repartition(1).to_kafka(topic)
    pipeline, inputs = REDIS_SET
    pipeline(*_streams(ssc, inputs)).to_redis(REDIS_KEY_PATTERN, mode="set")
    pipeline, inputs = REDIS_HASH
    pipeline(*_streams(ssc, inputs)).to_redis(mode="hash", hash_name=REDIS_HASH_NAME)
