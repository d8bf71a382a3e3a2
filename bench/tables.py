"""Stream-table join cost, in-process: the table read in place against the table shuffled.

Run: ``.venv/bin/python bench/tables.py [--keys 100000] [--views 20000] [--batches 10]``.

One process runs the fleet's planner, scheduler and executor (``engine.local.LocalRunner``)
over ``--batches`` batches of ``--views`` page views keyed by user, joined with a table of
``--keys`` users that gets 1 % of its keys updated every batch. Three ways, same output:

* ``table``: ``views.join(table)``, the table's partitions read in place by the join;
* ``snapshot``: ``views.join(table.snapshot())``, an ordinary join that shuffles the whole
  table every batch (what a stream-stream join with the table's state would cost);
* ``dict``: a plain Python loop, one dict lookup per view (no engine at all).

Prints views/s per way (best of ``--rounds``) and the machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import print_machine
from engine import StreamingContext
from engine.local import LocalRunner


def _inputs(keys: int, views: int, batches: int) -> tuple[list[Any], list[Any]]:
    rnd = random.Random(7)
    first = [(f"u{i}", {"country": f"c{i % 50}"}) for i in range(keys)]
    updates = [first] + [
        [(f"u{rnd.randrange(keys)}", {"country": f"c{b}"}) for _ in range(keys // 100)]
        for b in range(1, batches)
    ]
    view_batches = [
        [(f"u{rnd.randrange(keys)}", {"url": f"/page/{i % 40}"}) for i in range(views)]
        for _ in range(batches)
    ]
    return updates, view_batches


def _engine(way: str, updates: list[Any], views: list[Any]) -> tuple[float, int]:
    ssc = StreamingContext(1.0, num_partitions=4)
    table = ssc.table(updates=ssc.queue_stream(updates))
    right = table if way == "table" else table.snapshot()
    out = [0]
    ssc.queue_stream(views).join(right).foreach_batch(
        lambda t, r: out.__setitem__(0, out[0] + len(r))
    )
    runner = LocalRunner(ssc)
    runner.run_batch()  # the table's load: not timed
    t0 = time.perf_counter()
    for _ in range(len(views) - 1):
        runner.run_batch()
    return time.perf_counter() - t0, out[0]


def _plain(updates: list[Any], views: list[Any]) -> tuple[float, int]:
    table: dict[str, Any] = dict(updates[0])
    n = sum(1 for k, _ in views[0] if k in table)
    t0 = time.perf_counter()
    for ups, vs in zip(updates[1:], views[1:], strict=True):
        table.update(ups)
        joined = [(k, (v, table[k])) for k, v in vs if k in table]
        n += len(joined)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--views", type=int, default=20_000)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    print_machine()
    updates, views = _inputs(a.keys, a.views, a.batches)
    timed = a.views * (a.batches - 1)
    print(f"table {a.keys} keys (1 % updated per batch), {a.batches - 1} timed batches of")
    print(f"{a.views} views, 4 partitions, in-process")
    counts = set()
    for way in ("table", "snapshot", "dict"):
        best = float("inf")
        for _ in range(a.rounds):
            secs, n = _plain(updates, views) if way == "dict" else _engine(way, updates, views)
            best = min(best, secs)
            counts.add(n)
        print(f"{way:>9}: {timed / best:>12,.0f} views/s  ({best / (a.batches - 1):.3f} s/batch)")
    assert len(counts) == 1, f"the three ways joined different counts: {counts}"


if __name__ == "__main__":
    main()
