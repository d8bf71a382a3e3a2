"""The fleet: 3 workers, 6 partitions, running count and sliding window vs the reference."""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path
from typing import Any

import redis

from engine.graph import StreamingContext
from engine.reference import ReferenceRunner
from ops.services import load_app
from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from state.metalog import RedisMetaLog
from tests.fleetkit import completed_batches, http_status, read_topic, run_fleet, wait_for

APP = "tests/apps/pageviews_window.py"


def _by_batch(messages: list[Any]) -> dict[int, list[tuple[Any, Any]]]:
    out: dict[int, list[tuple[Any, Any]]] = collections.defaultdict(list)
    for m in messages:
        out[int(dict(m.headers())["dstream-batch-seq"])].append(
            (json.loads(m.key()), json.loads(m.value()))
        )
    return out


def test_three_workers_six_partitions_equal_reference(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path, monkeypatch
) -> None:
    inp, counts_out, window_out = new_topic(6), new_topic(2), new_topic(2)
    port = free_port()
    env = {
        "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_BATCH_INTERVAL": "1.0",
        "DSTREAM_HTTP_PORT": str(port),
        "PAGEVIEWS_TOPIC": inp,
        "COUNTS_OUTPUT": counts_out,
        "WINDOW_OUTPUT": window_out,
    }
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=6000, keys=30, seed=11)
    feeding = threading.Thread(
        target=produce_pageviews,
        args=(kafka_bootstrap, inp),
        kwargs={"rate": 2000, "duration": 6, "keys": 30, "seed": 12},
    )
    samples: list[dict[str, Any]] = []
    with run_fleet(APP, workers=3, env=env, tmp=tmp_path) as fleet:
        wait_for(
            lambda: len(read_topic(kafka_bootstrap, counts_out, idle_s=0.3)) > 0, 60, "first output"
        )
        feeding.start()
        while feeding.is_alive():
            samples.append(http_status(port))
            time.sleep(1)
        feeding.join()
        total = 6000 + 12000

        def drained() -> bool:
            st = http_status(port)
            samples.append(st)
            return sum(r["position"] for r in st["receivers"]) >= total

        wait_for(drained, 60, "all input consumed")
        time.sleep(4)  # let the last batches commit
        final = http_status(port)
        code = fleet.interrupt()
        log = fleet.log
    assert code == 0, log
    assert "Traceback" not in log, log

    # spread: every worker owns receivers and holds blocks; every block had two holders
    owners = {r["owner"] for r in final["receivers"]}
    assert len(owners) == 3, final["receivers"]
    assert all(w["received"] > 0 for w in final["workers"]), final["workers"]
    assert any(all(w["blocks"] > 0 for w in s["workers"]) for s in samples)
    assert final["under_replicated_blocks"] == 0

    # committed outputs equal the reference runner over the logged batches
    meta = RedisMetaLog(redis.Redis.from_url(redis_url), app_id)
    done = meta.done()
    assert done is not None and done >= 10
    ranges = meta.batches()
    records = {
        (m.partition(), m.offset()): json.loads(m.value()) for m in read_topic(kafka_bootstrap, inp)
    }
    monkeypatch.setenv("PAGEVIEWS_TOPIC", inp)
    monkeypatch.setenv("COUNTS_OUTPUT", counts_out)
    monkeypatch.setenv("WINDOW_OUTPUT", window_out)
    ssc = StreamingContext(1.0, num_partitions=4)
    load_app(APP).build(ssc)
    src = next(n for n in ssc.nodes if n.kind == "source")
    batches = []
    for b in range(done + 1):
        recs = []
        for bid, (_t, p, lo, until, _n) in sorted(ranges[b].items()):
            if not bid.startswith("@"):
                recs += [records[(p, o)] for o in range(lo, until)]
        batches.append(recs)
    assert sum(map(len, batches)) == total
    ref = ReferenceRunner(ssc, inputs={src.id: batches})
    ref.run(done + 1)
    outs = [n for n in ssc.nodes if n.kind == "output"]
    for node, topic in zip(outs, (counts_out, window_out), strict=True):
        got = _by_batch(read_topic(kafka_bootstrap, topic))
        for b, expected in ref.outputs[node.id]:
            assert sorted(got.get(b, [])) == sorted(map(tuple, expected)), (topic, b)


def test_backpressure_keeps_batches_in_time(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path
) -> None:
    inp, out = new_topic(3), new_topic(1)
    port = free_port()
    env = {
        "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_BATCH_INTERVAL": "0.5",
        "DSTREAM_HTTP_PORT": str(port),
        "DSTREAM_MAX_RECORDS_PER_PARTITION": "400",
        "DSTREAM_ADAPTIVE_RATE": "true",
        "PAGEVIEWS_TOPIC": inp,
        "PAGEVIEWS_OUTPUT": out,
    }
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=60000, keys=100, seed=5)
    with run_fleet("examples/pageviews.py", workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(lambda: completed_batches(port) >= 3, 60, "three batches")
        samples = []
        for _ in range(8):
            samples.append(http_status(port))
            time.sleep(0.5)
        fleet.interrupt()
    last = samples[-1]
    # input is capped per partition per batch: the fleet is not flooded
    assert all(b["records"] <= 3 * 400 for b in last["batches"]), last["batches"]
    # batches keep finishing: few pending, and the lag is reported instead
    assert max(len(s["pending"]) for s in samples) <= 3, [s["pending"] for s in samples]
    assert len(last["batches"]) >= 8
    lags = [r["lag"] for r in last["receivers"]]
    assert all(lag is not None and lag > 0 for lag in lags), last["receivers"]
    done = [b for b in last["batches"] if b["total_delay"] is not None]
    slow = [b for b in done[-5:] if b["total_delay"] > 1.5]
    assert len(slow) <= 1, done[-5:]
