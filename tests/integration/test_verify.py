"""``dstream verify``: passes the fleet's real output, reports every kind of corruption."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from engine import StreamingContext
from engine.errors import ConfigError
from ops.tools.produce import produce_pageviews
from ops.tools.verify import plan_for
from tests.fleetkit import ROOT, fleet_env, last_values, read_topic, run_fleet, wait_for

N = 3000


def _verify(kafka_bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "verify", "--app", "examples/pageviews.py", *args],
        cwd=ROOT,
        env={**os.environ, "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _txn_producer(kafka_bootstrap: str) -> Any:
    p = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"corrupt-{uuid.uuid4().hex}"}
    )
    p.init_transactions(30)
    return p


def _send(p: Any, topic: str, key: Any, value: Any, seq: int) -> None:
    p.produce(
        topic,
        key=json.dumps(key).encode(),
        value=json.dumps(value).encode(),
        headers=[("dstream-batch", str(seq * 500).encode()), ("dstream-batch-seq", str(seq))],
    )


def test_verify_passes_real_output_and_reports_corruptions(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    inp, out = new_topic(3), new_topic(1)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=N, keys=40, seed=3)
    expected = collections.Counter(
        json.loads(m.value())["url"] for m in read_topic(kafka_bootstrap, inp)
    )
    env = fleet_env(
        kafka_bootstrap,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL="0.5",
    )
    with run_fleet("examples/pageviews.py", workers=2, tmp=tmp_path, env=env) as fleet:
        wait_for(
            lambda: last_values(read_topic(kafka_bootstrap, out, idle_s=0.5)) == expected,
            90,
            "the running counts to equal the input",
        )
        assert fleet.interrupt() == 0, fleet.log

    ok = _verify(kafka_bootstrap, "--input", inp, "--output", out)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verify OK" in ok.stdout
    assert f"over {N} records of {inp}" in ok.stdout
    assert f"{len(expected)} keys" in ok.stdout

    # a corrupted copy of the output: one key dropped, then (transactionally, after the
    # last batch) one wrong value, one key the input never had and one key written twice
    # in a batch; plus an aborted transaction, which read_committed must not see
    messages = read_topic(kafka_bootstrap, out)
    last_seq = max(int(dict(m.headers())["dstream-batch-seq"]) for m in messages)
    urls = sorted(expected)
    dropped, wrong, dup = urls[0], urls[1], urls[2]
    bad = new_topic(1)
    p = _txn_producer(kafka_bootstrap)
    p.begin_transaction()
    for m in messages:
        if json.loads(m.key()) != dropped:
            p.produce(bad, key=m.key(), value=m.value(), headers=m.headers())
    p.commit_transaction(30)
    p.begin_transaction()
    _send(p, bad, wrong, expected[wrong] + 5, last_seq + 1)
    _send(p, bad, "/not-in-input", 1, last_seq + 1)
    _send(p, bad, dup, expected[dup], last_seq + 2)
    _send(p, bad, dup, expected[dup], last_seq + 2)
    p.commit_transaction(30)
    p.begin_transaction()
    _send(p, bad, urls[3], -1, last_seq + 3)
    p.flush(30)
    p.abort_transaction(30)

    res = _verify(kafka_bootstrap, "--input", inp, "--output", bad)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert f'missing  key "{dropped}": expected {expected[dropped]}, not in the output' in lines
    assert f'wrong    key "{wrong}": expected {expected[wrong]}, got {expected[wrong] + 5}' in lines
    assert 'extra    key "/not-in-input": 1 is not in the reference' in lines
    assert f'duplicate key "{dup}": written 2 times in batch {last_seq + 2}' in lines
    assert len(lines) == 4, res.stdout  # the aborted write to urls[3] is not reported
    assert "4 difference(s)" in res.stderr

    # --max-print caps the listing, not the verdict
    capped = _verify(kafka_bootstrap, "--input", inp, "--output", bad, "--max-print", "1")
    assert capped.returncode == 1
    assert capped.stdout.splitlines()[-1] == "... and 3 more"


def test_verify_refuses_outputs_that_depend_on_batch_boundaries() -> None:
    ssc = StreamingContext(1.0)
    ones = ssc.kafka_stream("in").map(lambda e: (e["url"], 1))
    ones.reduce_by_key_and_window(lambda a, b: a + b, window=4.0).to_kafka("out")
    with pytest.raises(ConfigError, match="batch boundaries"):
        plan_for(ssc, "out")

    ssc = StreamingContext(1.0)
    ones = ssc.kafka_stream("in").map(lambda e: (e["url"], 1))
    ones.reduce_by_key(max).running_reduce(lambda a, b: a + b).to_kafka("out")
    with pytest.raises(ConfigError, match="reduce_by_key"):
        plan_for(ssc, "out")


def test_verify_modes() -> None:
    ssc = StreamingContext(1.0)
    views = ssc.kafka_stream("in")
    views.filter(lambda e: e["url"]).map(lambda e: (e["url"], e["user"])).to_kafka("a")
    views.map(lambda e: (e["url"], 1)).running_reduce(lambda a, b: a + b).to_kafka("b")
    assert plan_for(ssc, "a").mode == "records"
    assert plan_for(ssc, "b").mode == "changelog"
    with pytest.raises(ConfigError, match="pass --output"):
        plan_for(ssc, None)
