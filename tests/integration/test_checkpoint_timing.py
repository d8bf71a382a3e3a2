"""A large state is checkpointed in the background: batch times do not jump at checkpoints."""

from __future__ import annotations

import statistics
import threading
import time

import redis

from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from state.metalog import RedisMetaLog
from tests.fleetkit import completed_batches, fleet_env, http_status, wait_for

EVERY = 4  # checkpoint every 4 batches


def test_checkpoints_do_not_hold_batches_back(
    kafka_bootstrap, redis_url, app_id, new_topic, tmp_path
) -> None:
    from tests.fleetkit import run_fleet

    inp, out = new_topic(4), new_topic(1)
    port = free_port()
    # a large state: 100,000 distinct urls in the running count
    produce_pageviews(
        kafka_bootstrap, inp, rate=0, count=100_000, keys=100_000, seed=1, key_dist="uniform"
    )
    env = fleet_env(
        kafka_bootstrap,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL="0.5",
        DSTREAM_CHECKPOINT_EVERY=str(EVERY),
        DSTREAM_HTTP_PORT=str(port),
    )
    meta = RedisMetaLog(redis.Redis.from_url(redis_url), app_id)
    with run_fleet("examples/pageviews.py", workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(lambda: completed_batches(port) >= 3, 90, "the first batches")
        feed = threading.Thread(
            target=produce_pageviews,
            args=(kafka_bootstrap, inp),
            kwargs={"rate": 4000, "duration": 14, "keys": 100_000, "seed": 2},
        )
        feed.start()
        feed.join()
        time.sleep(1)
        st = http_status(port)
        fleet.interrupt()
    checkpoints = meta.checkpoints()
    assert len(checkpoints) == 4, "every state partition was checkpointed"
    steady = [b for b in st["batches"] if b["processing_time"] is not None and b["records"] > 0]
    steady = steady[3:]  # after the pre-loaded backlog
    at_ckpt = [b["processing_time"] for b in steady if b["batch"] % EVERY in (EVERY - 1, 0)]
    other = [b["processing_time"] for b in steady if b["batch"] % EVERY not in (EVERY - 1, 0)]
    assert len(at_ckpt) >= 4 and len(other) >= 4, steady
    # the checkpoint batch and the one after it run as fast as the others (within noise)
    assert statistics.median(at_ckpt) <= 1.5 * statistics.median(other) + 0.05, (at_ckpt, other)
