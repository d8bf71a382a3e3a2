"""Tables (#15): how long a fresh app takes to read its table topic before its first batch.

A compacted users topic of ``--users`` records (``--partitions`` partitions) and a few
thousand page views; ``examples/enrich_pageviews.py`` on ``--workers`` workers with
``DSTREAM_MAX_RECORDS_PER_PARTITION=--cap``. Figures:

* ``plain``: one confluent-kafka consumer reading the users topic to its end (records/s);
* ``load``: the coordinator's ``tables loaded: N offsets in S s`` line (from the first
  assignment to every receiver at its target), as records/s;
* ``first batch``: from the fleet's launch to its first completed batch (start-up, load,
  then the batch, which joins every view with the whole table), and that batch's records.

    .venv/bin/python -m bench.table_load [--users 200000] [--cap 1000]
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench import _common as c

APP = "examples/enrich_pageviews.py"
LOADED = re.compile(r"tables loaded: (\d+) offsets in ([0-9.]+) s")


def plain_read(bootstrap: str, topic: str) -> tuple[int, float]:
    """Read *topic* from its earliest offsets to its ends: (records, seconds)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": c.unique("bench-plain"),
            "enable.auto.commit": False,
        }
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in parts
        }
        t0 = time.monotonic()
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        pos = dict.fromkeys(parts, 0)
        n = 0
        while any(pos[p] < ends[p] for p in parts):
            for m in consumer.consume(10_000, 0.5):
                if m.error() is None:
                    n += 1
                    pos[m.partition()] = m.offset() + 1
        return n, time.monotonic() - t0
    finally:
        consumer.close()


def fleet_load(args: argparse.Namespace, bootstrap: str, users: str, views: str) -> dict[str, Any]:
    out = c.unique("bench-enriched")
    c.create_topic(bootstrap, out, 1)
    env = {
        "DSTREAM_LOG_LEVEL": "INFO",
        "DSTREAM_BATCH_INTERVAL": str(args.interval),
        "DSTREAM_MAX_RECORDS_PER_PARTITION": str(args.cap),
        "PAGEVIEWS_TOPIC": views,
        "USERS_TOPIC": users,
        "ENRICHED_OUTPUT": out,
    }
    t0 = time.monotonic()
    with c.run_fleet(APP, workers=args.workers, env=env, log_dir=c.RESULTS / "logs") as fleet:
        deadline = t0 + args.timeout
        loaded: tuple[int, float] | None = None
        first: tuple[float, int] | None = None
        while time.monotonic() < deadline and (loaded is None or first is None):
            if fleet.proc.poll() is not None:
                msg = f"the fleet exited:\n{fleet.log_tail()}"
                raise RuntimeError(msg)
            if loaded is None:
                m = LOADED.search(fleet.log_path.read_text(errors="replace"))
                if m:
                    loaded = (int(m.group(1)), float(m.group(2)))
            st = fleet.status()
            done = [b for b in (st or {}).get("batches", []) if b.get("total_delay") is not None]
            if first is None and done:
                b0 = min(done, key=lambda b: b["batch"])
                first = (time.monotonic() - t0, int(b0["records"]))
            time.sleep(0.05)
        if loaded is None or first is None:
            msg = f"no load line or no completed batch in {args.timeout}s:\n{fleet.log_tail()}"
            raise RuntimeError(msg)
    return {
        "offsets": loaded[0],
        "load_s": loaded[1],
        "first_s": first[0],
        "first_records": first[1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--views", type=int, default=3000)
    ap.add_argument("--cap", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    c.print_machine()
    bootstrap, _ = c.services()
    from ops.services import load_app
    from ops.tools.produce import produce_pageviews

    users, views = c.unique("bench-users"), c.unique("bench-views")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = NewTopic(users, num_partitions=args.partitions, config={"cleanup.policy": "compact"})
    admin.create_topics([new])[users].result(30)
    t0 = time.monotonic()
    load_app(APP).write_users(bootstrap, users, args.users)
    print(f"wrote {args.users:,} users in {time.monotonic() - t0:.1f} s", flush=True)
    c.create_topic(bootstrap, views, 3)
    produce_pageviews(bootstrap, views, rate=0, count=args.views, keys=40, seed=5)
    n, secs = plain_read(bootstrap, users)
    print(f"plain: read {n:,} records in {secs:.2f} s ({n / secs:,.0f} records/s)", flush=True)
    r = fleet_load(args, bootstrap, users, views)
    print(
        f"load: {r['offsets']:,} offsets in {r['load_s']:.2f} s "
        f"({r['offsets'] / max(r['load_s'], 1e-9):,.0f} offsets/s; cap {args.cap}/partition/batch, "
        f"{args.workers} workers, {args.partitions} table partitions)",
        flush=True,
    )
    print(
        f"first batch: completed {r['first_s']:.2f} s after launch, {r['first_records']:,} records",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
