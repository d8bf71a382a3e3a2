"""Redis with AUTH: the fleet connects with the password, and never logs it."""

from __future__ import annotations

import collections
import json
import subprocess
import time
from pathlib import Path

import pytest
import redis

from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from tests.fleetkit import last_values, read_topic, run_fleet, wait_for

PASSWORD = "correct-horse-battery-staple"


@pytest.fixture
def auth_redis(tmp_path: Path):
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            PASSWORD,
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, password=PASSWORD)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield port
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("how", ["url", "password-variable"])
def test_fleet_with_redis_auth(auth_redis, how, kafka_bootstrap, app_id, new_topic, tmp_path):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=auth_redis, password="wrong").ping()
    inp, out = new_topic(2), new_topic(1)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=1500, keys=10, seed=9)
    env = {
        "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DSTREAM_APP_ID": app_id,
        "PAGEVIEWS_TOPIC": inp,
        "PAGEVIEWS_OUTPUT": out,
        "DSTREAM_BATCH_INTERVAL": "0.5",
    }
    if how == "url":
        env["DSTREAM_REDIS_URL"] = f"redis://:{PASSWORD}@127.0.0.1:{auth_redis}/0"
    else:
        env["DSTREAM_REDIS_URL"] = f"redis://127.0.0.1:{auth_redis}/0"
        env["DSTREAM_REDIS_PASSWORD"] = PASSWORD
    expected = collections.Counter(
        json.loads(m.value())["url"] for m in read_topic(kafka_bootstrap, inp)
    )
    with run_fleet("examples/pageviews.py", workers=1, env=env, tmp=tmp_path) as fleet:
        wait_for(
            lambda: last_values(read_topic(kafka_bootstrap, out, idle_s=0.3)) == expected,
            90,
            "exact counts",
        )
        fleet.interrupt()
        log = fleet.log
    assert PASSWORD not in log
    keys = redis.Redis(port=auth_redis, password=PASSWORD).keys(f"dstream:{app_id}:*")
    assert keys, "the fleet wrote no metadata to the password-protected Redis"
