"""Stop the whole app mid-stream (SIGTERM) and start it again: exactly-once output."""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path

import redis

from engine.codec import unpack
from ops.tools.produce import produce_pageviews
from state.checkpoint import RedisCheckpointStore
from state.metalog import RedisMetaLog
from tests.fault.scenario import check_exactly_once
from tests.fleetkit import read_topic, run_fleet, wait_for


def _env(kafka: str, redis_url: str, app_id: str, inp: str, out: str) -> dict[str, str]:
    return {
        "DSTREAM_KAFKA_BOOTSTRAP": kafka,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "PAGEVIEWS_TOPIC": inp,
        "PAGEVIEWS_OUTPUT": out,
        "DSTREAM_BATCH_INTERVAL": "0.3",
        "DSTREAM_CHECKPOINT_EVERY": "4",
    }


def test_sigterm_and_restart_is_exactly_once(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path
) -> None:
    inp, out = new_topic(3), new_topic(2)
    env = _env(kafka_bootstrap, redis_url, app_id, inp, out)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=3000, keys=40, seed=1)
    feeding = threading.Thread(
        target=produce_pageviews,
        args=(kafka_bootstrap, inp),
        kwargs={"rate": 1500, "duration": 6, "keys": 40, "seed": 2},
    )
    with run_fleet("examples/pageviews.py", workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(
            lambda: len(read_topic(kafka_bootstrap, out, idle_s=0.3)) >= 40, 60, "first output"
        )
        feeding.start()
        time.sleep(2.5)  # stop mid-stream, while input still arrives
        code = fleet.interrupt()
        first_log = fleet.log
    assert code == 0, first_log
    feeding.join()
    views = read_topic(kafka_bootstrap, inp)
    expected = collections.Counter(json.loads(m.value())["url"] for m in views)
    assert sum(expected.values()) == 3000 + 9000

    with run_fleet("examples/pageviews.py", workers=2, env=env, tmp=tmp_path) as fleet:

        def caught_up() -> bool:
            last: dict[str, int] = {}
            for m in read_topic(kafka_bootstrap, out, idle_s=0.3):
                last[json.loads(m.key())] = max(
                    last.get(json.loads(m.key()), 0), json.loads(m.value())
                )
            return last == dict(expected)

        wait_for(caught_up, 120, "the restarted app to catch up")
        second_log = fleet.log
        fleet.interrupt()
    assert "Traceback" not in first_log + second_log, second_log
    assert "resuming at batch 0" not in second_log, "the second run must resume, not restart"
    check_exactly_once(read_topic(kafka_bootstrap, out), expected)


def test_checkpoint_equals_reference_state(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path
) -> None:
    inp, out = new_topic(3), new_topic(1)
    env = _env(kafka_bootstrap, redis_url, app_id, inp, out)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=4000, keys=30, seed=3)
    client = redis.Redis.from_url(redis_url)
    meta = RedisMetaLog(client, app_id)
    with run_fleet("examples/pageviews.py", workers=2, env=env, tmp=tmp_path) as fleet:
        feeding = threading.Thread(
            target=produce_pageviews,
            args=(kafka_bootstrap, inp),
            kwargs={"rate": 1000, "duration": 3, "keys": 30, "seed": 4},
        )
        feeding.start()
        feeding.join()
        # a checkpoint of every state partition, taken after the input stopped growing
        wait_for(
            lambda: len(meta.checkpoints()) == 4 and min(meta.checkpoints().values()) > 10,
            60,
            "a checkpoint of each of the 4 state partitions",
        )
        fleet.interrupt()
    # the reference state at checkpoint batch c: counts over every record in batches <= c
    store = RedisCheckpointStore(client, app_id)
    batches = meta.batches()
    records = {
        (m.partition(), m.offset()): json.loads(m.value())["url"]
        for m in read_topic(kafka_bootstrap, inp)
    }
    checked = 0
    for (node, part), c in meta.checkpoints().items():
        got = dict(store.read_items(node, part, c))
        ref: collections.Counter = collections.Counter()
        for b, ranges in batches.items():
            if b > c:
                continue
            for bid, rng in ranges.items():
                if bid.startswith("@"):
                    continue
                _topic, p, lo, until, _n = rng
                ref.update(records[(p, o)] for o in range(lo, until))
        from engine.codec import stable_hash

        mine = {url: (n, 0) for url, n in ref.items()}
        mine = {url: n for url, (n, _) in mine.items() if stable_hash(url) % 4 == part}
        assert got == mine, f"checkpoint of partition {part} at batch {c} differs"
        checked += 1
    assert checked == 4  # one per state partition
    assert unpack is not None
