"""Named stateful streams of every queryable kind, over a deterministic queue input.

Batch i holds :func:`records` (i); the tests compute the reference state at any batch from
the same function (:func:`pipeline` on a fresh context) and compare ``dstream query`` and
``GET /api/state/...`` answers with it.
"""

from __future__ import annotations

import operator
from typing import Any

from engine import TIMEOUT, DStream, StreamingContext

#: Batches of input; the app idles (empty batches) after them.
NUM_BATCHES = 600
PARTITIONS = 3


def records(i: int) -> list[tuple[str, int]]:
    """The input of the app's i-th batch (i = batch - first)."""
    return [(f"k{(i * 7 + j) % 23:02d}", (i + j) % 5 + 1) for j in range(i % 9 + 1)]


def _total(new: list[int], old: int | None) -> int | None:
    s = (old or 0) + sum(new)
    return None if new and s % 11 == 0 else s  # deletes some keys now and then


def _init(_key: str, v: int) -> list[int]:
    return [1, v]


def _update(_key: str, st: list[int], v: Any) -> list[int] | None:
    if v is TIMEOUT:
        return None
    return [st[0] + 1, max(st[1], v)]


def pipeline(src: DStream) -> None:
    """The app's graph over *src* (the same in the app and in the reference)."""
    pairs = src.map(lambda kv: (kv[0], kv[1]))
    pairs.running_reduce(operator.add, PARTITIONS).name("counts")
    pairs.update_state_by_key(_total, PARTITIONS).name("totals")
    pairs.track(_init, _update, timeout="0.6s", num_partitions=PARTITIONS).name("sessions")
    pairs.reduce_by_key_and_window(
        operator.add, operator.sub, "0.8s", "0.4s", num_partitions=PARTITIONS
    ).name("recent")
    pairs.window("0.6s", "0.4s").name("last")
    pairs.name("pairs").foreach_batch(lambda _t, _r: None)


def build(ssc: StreamingContext) -> None:
    pipeline(ssc.queue_stream([records(i) for i in range(NUM_BATCHES)]))
