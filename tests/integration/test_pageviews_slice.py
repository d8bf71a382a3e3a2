"""The first slice on the real process topology: Kafka -> blocks -> tasks -> Kafka."""

from __future__ import annotations

import collections
import itertools
import json
import subprocess
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from ops.tools.produce import produce_pageviews
from state.metalog import RedisMetaLog
from tests.fleetkit import fleet_env, last_values, read_topic, run_fleet, wait_for

N = 6000


def _env(kafka_bootstrap: str, redis_url: str, app_id: str, inp: str, out: str) -> dict[str, str]:
    return fleet_env(
        kafka_bootstrap,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL="0.5",
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_pageview_counts_exact_and_offsets_contiguous(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path, workers: int
) -> None:
    inp, out = new_topic(3), new_topic(1)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=N, keys=50, seed=7)
    views = read_topic(kafka_bootstrap, inp)
    assert len(views) == N
    expected = collections.Counter(json.loads(m.value())["url"] for m in views)

    with run_fleet(
        "examples/pageviews.py",
        workers=workers,
        tmp=tmp_path,
        env=_env(kafka_bootstrap, redis_url, app_id, inp, out),
    ) as fleet:
        wait_for(
            lambda: last_values(read_topic(kafka_bootstrap, out, idle_s=0.5)) == expected,
            90,
            "the running counts to equal the input",
        )
        # more input while running: still exact
        produce_pageviews(kafka_bootstrap, inp, rate=0, count=1000, keys=50, seed=8)
        more = read_topic(kafka_bootstrap, inp)
        expected = collections.Counter(json.loads(m.value())["url"] for m in more)
        wait_for(
            lambda: last_values(read_topic(kafka_bootstrap, out, idle_s=0.5)) == expected,
            90,
            "the running counts to include the second burst",
        )
        code = fleet.interrupt()
        log = fleet.log
    assert code == 0, log
    assert "Traceback" not in log, log

    # the batch offset ranges logged in Redis cover the input exactly
    meta = RedisMetaLog(redis.Redis.from_url(redis_url), app_id)
    batches = meta.batches()
    assert batches, "no batch was logged"
    per_tp: dict[tuple[str, int], list[tuple[int, int, int, int]]] = collections.defaultdict(list)
    for b, ranges in batches.items():
        for topic, part, lo, until, count in ranges.values():
            per_tp[(topic, part)].append((b, lo, until, count))
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "wm"})
    try:
        for part in range(3):
            rows = sorted(per_tp[(inp, part)])
            assert rows[0][1] == 0, "the first batch starts at the earliest offset"
            for (b1, _lo1, until1, _), (b2, lo2, _u2, _) in itertools.pairwise(rows):
                assert b2 == b1 + 1, "one range per batch per partition"
                assert lo2 == until1, f"gap or overlap between batch {b1} and {b2}"
            _low, high = c.get_watermark_offsets(TopicPartition(inp, part), timeout=10)
            assert rows[-1][2] == high, "the ranges reach the end of the partition"
            assert sum(r[2] - r[1] for r in rows) == sum(r[3] for r in rows) == high
    finally:
        c.close()
    assert sum(r[3] for rows in per_tp.values() for r in rows) == N + 1000


def test_run_rejects_a_missing_app_file(tmp_path: Path) -> None:
    res = subprocess.run(
        [".venv/bin/dstream", "run", str(tmp_path / "nope.py"), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode != 0
    assert "nope.py" in res.stderr
