"""Bounded memory: over a long run, the block store holds only what windows and state need.

Bounds are derived from the graph (window length, slide, partitions, distinct keys), not
from observed values: a block no window, state or lineage needs must be freed.
"""

from __future__ import annotations

import operator
from typing import Any

import pytest

from engine import StreamingContext
from engine.codec import encode_input_block, pack
from engine.local import LocalRunner
from engine.plan import block_batch
from state.blockstore import BlockStore

BATCHES = 300
P = 3  # reduce partitions
KEYS = 10
RECORDS = list(range(50))  # every batch: 50 records over KEYS keys


def _kv(x: int) -> tuple[int, int]:
    return x % KEYS, 1


def _block_bound() -> int:
    """Bytes of the largest block one batch of this input can give any node."""
    return max(
        len(encode_input_block("", 0, 10**6, 10**6 + 1, RECORDS)),  # input block
        len(pack([_kv(x) for x in RECORDS])),  # the persisted map output
        len(pack([(k, len(RECORDS) * BATCHES) for k in range(KEYS)])),  # a reduced block
        64 * KEYS + 1,  # a state block's accounted size
    )


@pytest.mark.parametrize(("w", "s"), [(5, 1), (6, 2), (6, 3)])
def test_window_with_inverse_and_running_reduce_keep_memory_bounded(w: int, s: int) -> None:
    ssc = StreamingContext(1.0, num_partitions=P)
    kv = ssc.queue_stream([], default=RECORDS).map(_kv)
    seen: dict[str, Any] = {}
    kv.reduce_by_key_and_window(operator.add, operator.sub, w, s).foreach_batch(
        lambda _t, recs: seen.__setitem__("window", sorted(recs))
    )
    kv.running_reduce(operator.add).foreach_batch(
        lambda _t, recs: seen.__setitem__("total", sorted(recs))
    )
    store = BlockStore()  # the worker's store, so the bounds are the fleet's
    runner = LocalRunner(ssc, store=store)

    # what a batch may hold after it completes, per the retention rules:
    # per-batch reduced slices for the window plus the slide that leaves next: (w + s) x P;
    # the previous window (read by the inverse) and the new one: 2 x P;
    # the previous and current running state: 2 x P;
    # one input block and one persisted map block (shared by two consumers): 2
    max_blocks = (w + s) * P + 2 * P + 2 * P + 2
    max_bytes = max_blocks * _block_bound()

    sizes: list[tuple[int, int]] = []
    for b in range(BATCHES):
        runner.run_batch()
        assert len(store) <= max_blocks, (b, sorted(store.ids()))
        assert store.nbytes <= max_bytes, (b, store.nbytes)
        sizes.append((len(store), store.nbytes))

    # nothing older than the window (plus the slide about to leave) is still held
    last = BATCHES - 1
    assert min(block_batch(bid) for bid in store.ids()) >= last - (w + s) + 1
    # steady input, flat memory: the same footprint at batch 100 and at the end
    assert sizes[100] == sizes[-1]
    # and the results are still right
    per_key = len(RECORDS) // KEYS
    assert seen["window"] == [(k, per_key * w) for k in range(KEYS)]
    assert seen["total"] == [(k, per_key * BATCHES) for k in range(KEYS)]


def test_window_without_inverse_keeps_memory_bounded() -> None:
    w = 4
    ssc = StreamingContext(1.0, num_partitions=P)
    src = ssc.queue_stream([], default=RECORDS)
    src.map(_kv).reduce_by_key_and_window(operator.add, None, w).foreach_batch(lambda _t, _r: None)
    src.window(w).count().foreach_batch(lambda _t, _r: None)
    store = BlockStore()  # the worker's store, so the bounds are the fleet's
    runner = LocalRunner(ssc, store=store)
    # reduced slices: w x P; window results: P; input blocks read by window(): w
    max_blocks = w * P + P + w
    for _ in range(BATCHES):
        runner.run_batch()
        assert len(store) <= max_blocks, sorted(store.ids())
        assert store.nbytes <= max_blocks * _block_bound()


def test_track_with_timeout_drops_expired_keys() -> None:
    # every batch brings 5 new keys that never come back: with a 3-batch timeout, state
    # holds at most (timeout + 1) x 5 keys
    timeout, new_keys = 3, 5
    batches = [[(f"u{b}-{i}", i) for i in range(new_keys)] for b in range(BATCHES)]
    ssc = StreamingContext(1.0, num_partitions=P)
    snap_sizes: list[int] = []
    ssc.queue_stream(batches).track(
        lambda _k, ev: ev, lambda _k, st, _ev: st, timeout=timeout
    ).snapshot().foreach_batch(lambda _t, recs: snap_sizes.append(len(recs)))
    store = BlockStore()  # the worker's store, so the bounds are the fleet's
    runner = LocalRunner(ssc, store=store)
    max_keys = (timeout + 1) * new_keys
    for _ in range(BATCHES):
        runner.run_batch()
        # state blocks of the previous and current batch, plus one input block
        assert len(store) <= 2 * P + 1
        assert store.nbytes <= 2 * P * (64 * max_keys + 1) + len(pack(batches[0])) + 64
    assert max(snap_sizes) <= max_keys
    assert snap_sizes[-1] == (timeout) * new_keys
