"""Bounded runs (#15): ``dstream run APP --until end`` over a pre-loaded topic, then exit 0.

A real fleet (a coordinator and 2 workers as processes), real Kafka and Redis: the run
processes exactly the records in the topic when it started, not those produced after the
stop offsets were fixed, its output equals the reference runner over those records, and
it exits 0 with its summary line.
"""

from __future__ import annotations

import collections
import json
import re
import time
from pathlib import Path

import redis
from confluent_kafka import Consumer, TopicPartition

from engine.graph import StreamingContext
from engine.reference import ReferenceRunner
from ops.services import load_app
from ops.tools.produce import produce_pageviews
from state.metalog import RedisMetaLog
from tests.fleetkit import fleet_env, last_values, read_topic, run_fleet, wait_for


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The high watermark of every partition of *topic*."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ends-{time.monotonic_ns()}"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        c.close()


APP = "examples/pageviews.py"
PRELOADED = 30_000


def test_until_end_processes_the_backlog_at_start_and_exits_0(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path, monkeypatch
) -> None:
    inp, out = new_topic(3), new_topic(2)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=PRELOADED, keys=50, seed=21)
    ends = end_offsets(kafka_bootstrap, inp)
    assert sum(ends.values()) == PRELOADED
    env = fleet_env(
        kafka_bootstrap,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL="1.0",
        # capped blocks: several batches, each cut as soon as the one before completed
        DSTREAM_MAX_RECORDS_PER_PARTITION="2000",
    )
    meta = RedisMetaLog(redis.Redis.from_url(redis_url), app_id)
    with run_fleet(APP, workers=2, env=env, tmp=tmp_path, args=("--until", "end")) as fleet:
        # once the run fixed its stop offsets, more records arrive: they are not read
        wait_for(
            lambda: meta.r.exists(meta.key("stop")) or fleet.proc.poll() is not None,
            60,
            "the stop offsets",
            every=0.05,
        )
        produce_pageviews(kafka_bootstrap, inp, rate=0, count=3_000, keys=50, seed=22)
        code = fleet.proc.wait(60)
        log = fleet.log
    assert code == 0, log
    assert "Traceback" not in log, log
    summary = re.search(r"bounded run finished: (\d+) records, (\d+) batches", log)
    assert summary is not None, log
    assert int(summary.group(1)) == PRELOADED, log
    assert not meta.r.exists(meta.key("stop"))  # the next run computes its own end

    # the logged batches cover exactly the pre-loaded offsets of every partition
    done = meta.done()
    ranges = meta.batches()
    assert done is not None and sorted(ranges) == list(range(done + 1))
    assert int(summary.group(2)) == done + 1
    assert done + 1 >= PRELOADED // (3 * 2000)
    # batch times advance by the interval, however fast the batches were cut
    times = [lb.time_ms for _b, lb in sorted(meta.logged().items())]
    assert [t - times[0] for t in times] == [1000 * b for b in range(done + 1)]
    messages = read_topic(kafka_bootstrap, inp)
    assert len(messages) == PRELOADED + 3_000
    records = {(m.partition(), m.offset()): json.loads(m.value()) for m in messages}
    read: dict[int, int] = {}
    batches = []
    for b in range(done + 1):
        recs = []
        for _bid, (_t, p, lo, until, n) in sorted(ranges[b].items()):
            assert until - lo == n and lo == read.get(p, 0)  # contiguous from offset 0
            read[p] = until
            recs += [records[(p, o)] for o in range(lo, until)]
        batches.append(recs)
    assert dict(read) == ends  # every partition read up to its end at start, no further
    # the reference runner over the same batches gives the same output, batch by batch
    monkeypatch.setenv("PAGEVIEWS_TOPIC", inp)
    monkeypatch.setenv("PAGEVIEWS_OUTPUT", out)
    ssc = StreamingContext(1.0)
    load_app(APP).build(ssc)
    src = next(n for n in ssc.nodes if n.kind == "source")
    ref = ReferenceRunner(ssc, inputs={src.id: batches})
    ref.run(done + 1)
    sink = next(n for n in ssc.nodes if n.kind == "output")
    got = collections.defaultdict(list)
    output = read_topic(kafka_bootstrap, out)
    for m in output:
        got[int(dict(m.headers())["dstream-batch-seq"])].append(
            (json.loads(m.key()), json.loads(m.value()))
        )
    for b, expected in ref.outputs[sink.id]:
        assert sorted(got.get(b, [])) == sorted(map(tuple, expected)), b
    # and the final counts are the plain count of the pre-loaded records
    plain = collections.Counter(r["url"] for recs in batches for r in recs)
    assert last_values(output) == dict(plain)
    assert sum(plain.values()) == PRELOADED


def test_bounds_resolve_to_offsets_on_a_real_broker(kafka_bootstrap: str, new_topic) -> None:
    """``earliest``/``end``/a timestamp become offsets (offsets_for_times; stop exclusive)."""
    from confluent_kafka import Producer

    from engine.bounds import Bound
    from ops.coordinator.bounded import kafka_offsets

    topic = new_topic(2)
    t0 = 1_796_040_000_000  # 2026-11-30T12:00:00Z
    prod = Producer({"bootstrap.servers": kafka_bootstrap})
    for p in (0, 1):
        for i in range(10):
            prod.produce(topic, b"x", partition=p, timestamp=t0 + 1000 * i)
    assert prod.flush(10) == 0
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"b-{time.monotonic_ns()}"})
    try:
        got = kafka_offsets(
            c,
            [
                ((0, 0), topic, 0, Bound("earliest")),
                ((0, 1), topic, 1, Bound("end")),
                ((1, 0), topic, 0, Bound("time", t0 + 4500)),  # first record at or after
                ((1, 1), topic, 1, Bound("time", t0 + 5000)),
                ((2, 0), topic, 0, Bound("time", t0 + 60_000)),  # after every record: the end
            ],
        )
    finally:
        c.close()
    assert got == {(0, 0): 0, (0, 1): 10, (1, 0): 5, (1, 1): 5, (2, 0): 10}
