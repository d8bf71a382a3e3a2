"""fail_on_error: a raising user function stops the app with the record's coordinates."""

from __future__ import annotations

import json

from confluent_kafka import Producer

from tests.fleetkit import fleet_env, run_fleet


def test_fleet_fails_with_the_error_and_coordinates(
    kafka_bootstrap, redis_url, app_id, new_topic, tmp_path
) -> None:
    inp, out = new_topic(1), new_topic(1)
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    p.produce(inp, json.dumps({"url": "/a", "user": "u", "ts": 1}).encode())
    p.produce(inp, json.dumps({"no-url": True}).encode())  # map raises KeyError on it
    p.flush(10)
    env = fleet_env(
        kafka_bootstrap,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_FAIL_ON_ERROR="true",
        DSTREAM_BATCH_INTERVAL="0.5",
    )
    with run_fleet("examples/pageviews.py", workers=1, env=env, tmp=tmp_path) as fleet:
        code = fleet.proc.wait(90)
        log = fleet.log
    assert code == 3, log
    assert "app failed" in log
    assert "KeyError" in log and f"topic={inp} partition=0 offset=1" in log, log
