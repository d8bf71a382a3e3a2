"""Lost Redis metadata is detected, never papered over (real Kafka, Redis, processes).

* Between two runs: the app's keys vanish while it is stopped; the next start refuses
  with one error line and exit code 5, writing nothing; ``dstream reset`` clears the
  markers and the app starts fresh, its new output a complete run of its own.
* During a run: the app's keys vanish (as in a ``FLUSHALL``); the fleet stops within a
  few batch intervals with the error line, and what it committed before is exact.

The app's keys are deleted rather than ``FLUSHALL``-ed: the session's Redis is shared
with other tests.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, TopicPartition

from ops.coordinator import METADATA_LOST
from ops.tools.produce import produce_pageviews
from state.metalog import decode_logged
from tests.fault.scenario import check_exactly_once
from tests.fleetkit import ROOT, fleet_env, read_topic, run_fleet, wait_for

APP = "examples/pageviews.py"
INTERVAL = "0.5"


def _env(kafka: str, redis_url: str, app_id: str, inp: str, out: str) -> dict[str, str]:
    return fleet_env(
        kafka,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL=INTERVAL,
        DSTREAM_CHECKPOINT_EVERY="4",
    )


def _counts(messages: list[Any]) -> dict[str, int]:
    last: dict[str, int] = {}
    for m in messages:
        k = json.loads(m.key())
        last[k] = max(last.get(k, 0), json.loads(m.value()))
    return last


def _app_keys(client: redis.Redis, app_id: str) -> list[bytes]:
    return list(client.scan_iter(match=f"dstream:{app_id}:*", count=1000))


def _ends(kafka: str, topic: str, parts: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": kafka, "group.id": f"ends-{time.monotonic_ns()}"})
    try:
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(parts)
        }
    finally:
        c.close()


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line and "metadata" in line.lower()]


def test_data_loss_between_runs_refuses_then_reset_starts_fresh(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    kafka = kafka_bootstrap
    inp, out = new_topic(2), new_topic(2)
    env = _env(kafka, redis_url, app_id, inp, out)
    produce_pageviews(kafka, inp, rate=0, count=800, keys=20, seed=5)
    expected = collections.Counter(json.loads(m.value())["url"] for m in read_topic(kafka, inp))
    with run_fleet(APP, workers=1, env=env, tmp=tmp_path) as fleet:
        wait_for(lambda: _counts(read_topic(kafka, out, idle_s=0.3)) == expected, 60, "run 1")
        assert fleet.interrupt() == 0, fleet.log
    first = read_topic(kafka, out)
    check_exactly_once(first, expected)

    client = redis.Redis.from_url(redis_url)
    keys = _app_keys(client, app_id)
    assert keys and client.delete(*keys)  # the wiped volume

    # the start refuses, with one line and its own exit code, and writes nothing
    with run_fleet(APP, workers=1, env=env, tmp=tmp_path) as fleet:
        code = fleet.proc.wait(60)
        log = fleet.log
    assert code == METADATA_LOST, log
    lines = _error_lines(log)
    assert any(
        f"app {app_id} has output commit markers in Kafka (batch " in line
        and "but no metadata in Redis: its Redis data was lost. Restore Redis from a backup, "
        f"or run `dstream reset --app-id {app_id}` to start the app fresh"
        in line
        for line in lines
    ), log
    assert "Traceback" not in log, log
    assert len(read_topic(kafka, out, idle_s=0.3)) == len(first), "nothing written"
    assert client.get(f"dstream:{app_id}:incarnation") is None, "no new identity taken"

    # dstream reset: the markers and the keys go; then the app starts fresh
    ends = _ends(kafka, out, 2)
    reset = subprocess.run(
        [sys.executable, "-m", "ops.cli", "reset", "--app-id", app_id],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reset.returncode == 0, reset.stderr
    assert f"reset app {app_id}: deleted" in reset.stdout and "-commits" in reset.stdout
    assert _app_keys(client, app_id) == []
    with run_fleet(APP, workers=1, env=env, tmp=tmp_path) as fleet:

        def second_run() -> list[Any]:
            return [
                m for m in read_topic(kafka, out, idle_s=0.3) if m.offset() >= ends[m.partition()]
            ]

        wait_for(lambda: _counts(second_run()) == expected, 60, "the fresh run")
        assert "resuming at batch 0" in fleet.log and "starts fresh" in fleet.log
        assert fleet.interrupt() == 0, fleet.log
    # as the docs say: the fresh run reads its input from the start again, so the topic
    # holds the old run's output followed by a complete, exact output of the new one
    check_exactly_once(second_run(), expected)
    assert len(read_topic(kafka, out)) == len(first) + len(second_run())


def test_data_loss_mid_run_stops_the_fleet_and_leaves_exact_output(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    kafka = kafka_bootstrap
    inp, out = new_topic(2), new_topic(2)
    env = _env(kafka, redis_url, app_id, inp, out)
    produce_pageviews(kafka, inp, rate=0, count=600, keys=20, seed=7)
    feeding = threading.Thread(
        target=produce_pageviews,
        args=(kafka, inp),
        kwargs={"rate": 400, "duration": 5, "keys": 20, "seed": 8},
    )
    client = redis.Redis.from_url(redis_url)
    with run_fleet(APP, workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(lambda: len(read_topic(kafka, out, idle_s=0.3)) > 0, 60, "first output")
        feeding.start()
        time.sleep(1.5)
        # FLUSHALL of this app: take its logged batches and delete its keys atomically
        keys = _app_keys(client, app_id)
        pipe = client.pipeline(transaction=True)
        pipe.hgetall(f"dstream:{app_id}:batches")
        pipe.delete(*keys)
        logged_raw, _ = pipe.execute()
        wiped_at = time.time()
        code = fleet.proc.wait(60)
        log = fleet.log
    feeding.join()
    assert code == METADATA_LOST, log
    lines = _error_lines(log)
    assert lines and any("METADATA_LOST" in line for line in lines), log
    # the coordinator said so within a few batch intervals of the loss
    said = min(
        datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() for line in lines
    )
    assert said - wiped_at < 4 * float(INTERVAL) + 1.0, (said - wiped_at, log)
    print(f"metadata loss noticed {said - wiped_at:.2f} s after the wipe (interval {INTERVAL} s)")

    # every committed batch is one the lost log held, written once, with exact values
    from engine.codec import unpack

    logged = {int(b): decode_logged(unpack(v)) for b, v in logged_raw.items()}
    records = [
        (m.partition(), m.offset(), json.loads(m.value())["url"]) for m in read_topic(kafka, inp)
    ]
    messages = read_topic(kafka, out)
    assert messages
    seen: set[tuple[str, int]] = set()
    for m in messages:
        b = int(dict(m.headers())["dstream-batch-seq"])
        url = json.loads(m.key())
        assert b in logged, f"batch {b} was committed but never logged before the loss"
        assert (url, b) not in seen, f"{url}: batch {b} written twice"
        seen.add((url, b))
        until: dict[int, int] = {}
        for lb in (logged[x] for x in logged if x <= b):
            for rng in lb.ranges.values():
                until[rng.partition] = max(until.get(rng.partition, 0), rng.until)
        want = sum(1 for p, o, u in records if u == url and o < until.get(p, 0))
        assert json.loads(m.value()) == want, f"{url} at batch {b}: {m.value()} != {want}"
