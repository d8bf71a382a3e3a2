"""Stream-table joins on a real ``--workers 2`` fleet, against the reference runner.

``examples/enrich_pageviews.py`` joins page views with a page table (a JSON-lines file) and
a user table (a compacted Kafka topic). Users are updated and deleted while the fleet
runs; every batch's output must equal the reference runner over the logged batches (both
sources' offset ranges), so each view saw the table as of the end of its own batch.
"""

from __future__ import annotations

import collections
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from engine.graph import StreamingContext
from engine.plan import block_node
from engine.reference import ReferenceRunner
from ops.services import load_app
from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from state.metalog import RedisMetaLog
from tests.fleetkit import Fleet, http_status, read_topic, run_fleet, wait_for

APP = "examples/enrich_pageviews.py"
USERS = 2_000  # the views' users are u0 ... u9999: a user missing from the table is "unknown"


def _produce_users(bootstrap: str, topic: str, updates: list[tuple[str, Any]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value in updates:
        p.produce(topic, key=key.encode(), value=None if value is None else json.dumps(value))
        p.poll(0)
    assert p.flush(30) == 0


def _by_batch(messages: list[Any]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = collections.defaultdict(list)
    for m in messages:
        b = int(dict(m.headers() or [])["dstream-batch-seq"])
        out[b].append(json.dumps([json.loads(m.key()), json.loads(m.value())], sort_keys=True))
    return out


def test_enrich_pageviews_equals_reference_through_updates_and_deletes(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path, monkeypatch
) -> None:
    run_enrich(kafka_bootstrap, redis_url, app_id, new_topic, tmp_path, monkeypatch)


def run_enrich(
    kafka_bootstrap: str,
    redis_url: str,
    app_id: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[Fleet], None] | None = None,
) -> dict[str, Any]:
    """Run the example through table updates (then *fault*); check it against the reference.

    Returns the coordinator's last status.
    """
    # the example's own loader creates the compacted users topic
    views, users = new_topic(3), f"users-{uuid.uuid4().hex[:8]}"
    out = new_topic(2)
    port = free_port()
    env = {
        "DSTREAM_HTTP_PORT": str(port),
        "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_BATCH_INTERVAL": "0.5",
        # no checkpoint during the run: every logged offset range stays for the reference
        "DSTREAM_CHECKPOINT_EVERY": "1000",
        "PAGEVIEWS_TOPIC": views,
        "USERS_TOPIC": users,
        "ENRICHED_OUTPUT": out,
    }
    load_app(APP).write_users(kafka_bootstrap, users, USERS)
    topic_cfg = ConfigResource("topic", users)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    cfg = admin.describe_configs([topic_cfg])[topic_cfg].result(30)
    assert cfg["cleanup.policy"].value == "compact"
    produce_pageviews(kafka_bootstrap, views, rate=0, count=3000, keys=40, seed=3)
    changed = [(f"u{i}", {"country": "xx"}) for i in range(0, USERS, 4)]  # updates
    changed += [(f"u{i}", None) for i in range(1, USERS, 4)]  # deletes
    changed += [(f"u{i}", {"country": "new"}) for i in range(USERS, USERS + 500)]  # inserts
    meta = RedisMetaLog(redis.Redis.from_url(redis_url), app_id)
    total = USERS + 3000 + len(changed) + 3000

    def logged_and_done() -> bool:
        done = meta.done()
        if done is None:
            return False
        ranges = meta.batches()
        return total == sum(
            r[3] - r[2]
            for b in range(done + 1)
            for bid, r in ranges.get(b, {}).items()
            if not bid.startswith("@")
        )

    with run_fleet(APP, workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(lambda: len(read_topic(kafka_bootstrap, out, idle_s=0.3)) > 0, 60, "output")
        _produce_users(kafka_bootstrap, users, changed)
        if fault is not None:
            fault(fleet)
        produce_pageviews(kafka_bootstrap, views, rate=0, count=3000, keys=40, seed=4)
        wait_for(logged_and_done, 90, "every record in a completed batch")
        status = http_status(port)
        code = fleet.interrupt()
        log = fleet.log
    assert code == 0, log
    assert "Traceback" not in log, log

    # the reference over the logged batches of both sources
    done = meta.done()
    assert done is not None
    ranges = meta.batches()
    records: dict[tuple[str, int, int], Any] = {}
    for m in read_topic(kafka_bootstrap, views):
        records[(views, m.partition(), m.offset())] = json.loads(m.value())
    for m in read_topic(kafka_bootstrap, users):
        value = m.value()
        records[(users, m.partition(), m.offset())] = (
            m.key().decode(),
            None if value is None else json.loads(value),
        )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ssc = StreamingContext(0.5, num_partitions=4)
    load_app(APP).build(ssc)
    sources = [n for n in ssc.nodes if n.kind == "source"]
    inputs: dict[int, list[list[Any]]] = {n.id: [] for n in sources}
    for b in range(done + 1):
        for n in sources:
            inputs[n.id].append([])
        for bid, (topic, p, lo, until, _n) in sorted(ranges[b].items()):
            if not bid.startswith("@"):
                inputs[block_node(bid)][b] += [records[(topic, p, o)] for o in range(lo, until)]
    ref = ReferenceRunner(ssc, inputs=inputs)
    ref.run(done + 1)
    (expected,) = ref.outputs.values()
    got = _by_batch(read_topic(kafka_bootstrap, out))
    seen: collections.Counter[str] = collections.Counter()
    for b, recs in expected:
        want = sorted(json.dumps([k, v], sort_keys=True) for k, v in recs)
        assert sorted(got.get(b, [])) == want, f"batch {b}"
        seen.update(v["country"] for _k, v in recs)
        seen.update(v["section"] for _k, v in recs)
    assert sum(len(r) for _, r in expected) == 6000
    # the run covered the cases: updated, deleted (unknown) and inserted users, file pages
    assert seen["xx"] > 0 and seen["unknown"] > 0 and seen["new"] > 0 and seen["news"] > 0
    return status


def test_the_first_batch_joins_with_the_whole_table_under_a_record_cap(
    kafka_bootstrap: str,
    redis_url: str,
    app_id: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    """A fresh app reads its table topic to its end before its first batch, cap or not.

    With at most 100 records per partition and batch, the 10,000 users would take 100
    batches to read; the first batch's block of the users partition must still cover the
    whole topic as it was at start, so every view of that batch (all of them by users
    the table holds) gets its user's country.
    """
    views, users, out = new_topic(3), f"users-{uuid.uuid4().hex[:8]}", new_topic(2)
    env = {
        "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_BATCH_INTERVAL": "0.5",
        "DSTREAM_MAX_RECORDS_PER_PARTITION": "100",
        "PAGEVIEWS_TOPIC": views,
        "USERS_TOPIC": users,
        "ENRICHED_OUTPUT": out,
    }
    app = load_app(APP)
    app.write_users(kafka_bootstrap, users, 10_000)  # every user the views name
    produce_pageviews(kafka_bootstrap, views, rate=0, count=600, keys=40, seed=5)
    meta = RedisMetaLog(redis.Redis.from_url(redis_url), app_id)

    def views_done() -> bool:
        done = meta.done()
        ranges = meta.batches()
        return (
            done is not None
            and sum(
                r[3] - r[2]
                for b in range(done + 1)
                for r in ranges.get(b, {}).values()
                if r[0] == views
            )
            == 600
        )

    with run_fleet(APP, workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(views_done, 60, "every view in a completed batch")
        code = fleet.interrupt()
        log = fleet.log
    assert code == 0, log
    assert "Traceback" not in log, log

    ranges = meta.batches()
    first = min(ranges)
    (table_range,) = [r for r in ranges[first].values() if r[0] == users]
    assert (table_range[2], table_range[3]) == (0, 10_000)  # the whole topic, one block
    first_views = [r for r in ranges[first].values() if r[0] == views]
    assert all(r[3] - r[2] <= 100 for r in first_views)  # the stream still had its cap
    # the first batch's output, against the table computed in plain Python
    values = {
        (m.partition(), m.offset()): json.loads(m.value())
        for m in read_topic(kafka_bootstrap, views)
    }
    expected = sorted(
        (values[(p, o)]["user"], values[(p, o)]["seq"], values[(p, o)]["url"])
        for _t, p, lo, until, _n in first_views
        for o in range(lo, until)
    )
    assert expected
    got = _by_batch(read_topic(kafka_bootstrap, out))[first]
    countries = {f"u{i}": app.COUNTRIES[i % len(app.COUNTRIES)] for i in range(10_000)}
    enriched = [json.loads(r) for r in got]
    assert sorted((k, v["seq"], v["url"]) for k, v in enriched) == expected
    assert all(v["country"] == countries[k] for k, v in enriched)
    assert "tables loaded: 10000 offsets" in log, log
    # the load targets were forgotten once the first batch completed
    assert not redis.Redis.from_url(redis_url).exists(f"dstream:{app_id}:load")
