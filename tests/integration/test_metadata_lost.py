"""Lost metadata against real services: every Lua fence refuses a missing epoch, and the
Kafka sink never takes another incarnation's commit marker for its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from engine.errors import DStreamError, MetadataLostError
from engine.graph import Node
from engine.plan import TaskSpec
from ops.config import load_settings
from ops.sinks import FleetSinks
from state.metalog import MetaLog, RedisMetaLog
from tests.fleetkit import ROOT, read_topic
from tests.unit.state.metadata_lost_contract import CHECKS


def _wipe(client: redis.Redis, app_id: str) -> Callable[[], None]:
    def wipe() -> None:
        keys = list(client.scan_iter(match=f"dstream:{app_id}:*"))
        if keys:
            client.delete(*keys)

    return wipe


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_redis_metadata_lost(
    check: Callable[[MetaLog, Callable[[], None]], None],
    redis_client: redis.Redis,
    app_id: str,
) -> None:
    check(RedisMetaLog(redis_client, app_id), _wipe(redis_client, app_id))


def test_redis_sink_commit_refuses_a_missing_epoch(
    redis_url: str, redis_client: redis.Redis, app_id: str
) -> None:
    """``_REDIS_COMMIT``: writes under the current epoch, refuses (and writes nothing)
    once the epoch key is gone, whatever epoch the caller carries."""
    meta = RedisMetaLog(redis_client, app_id)
    lease = meta.acquire_lease("10.0.0.1:7070", 5.0)
    assert lease is not None
    epoch = [lease.epoch]
    settings = load_settings(redis_url=redis_url, app_id=app_id)
    sinks = FleetSinks(settings, app_id, epoch_fn=lambda: epoch[0])
    node = Node(7, "output", (), {"sink": "redis", "mode": "hash", "hash_name": "counts"}, "counts")

    def spec(b: int) -> TaskSpec:
        return TaskSpec(f"out/7/{b}/0", "output", 7, 0, b, 0, (), "s")

    sinks.commit(node, spec(0), 0, [("a", 1)])
    assert redis_client.hgetall(f"dstream:{app_id}:counts") == {b"a": b"1"}
    _wipe(redis_client, app_id)()
    for e in (lease.epoch, 0):
        epoch[0] = e
        with pytest.raises(MetadataLostError, match="METADATA_LOST"):
            sinks.commit(node, spec(1), 0, [("a", 2)])
    assert redis_client.hgetall(f"dstream:{app_id}:counts") == {}, "nothing written"
    assert sinks.committed_batches == 1


def test_a_kafka_marker_of_another_incarnation_is_never_taken_as_written(
    kafka_bootstrap: str, app_id: str, new_topic: Any
) -> None:
    """The marker carries the incarnation; another run's marker stops the task, and the
    batch it seems to cover is neither skipped nor written."""
    topic = new_topic(1)
    settings = load_settings(kafka_bootstrap=kafka_bootstrap, app_id=app_id)
    node = Node(4, "output", (), {"sink": "kafka", "topic": topic, "format": "json"}, "out")

    def spec(b: int) -> TaskSpec:
        return TaskSpec(f"out/4/{b}/0", "output", 4, 0, b, 0, (), "s")

    def retried(sinks: FleetSinks, b: int, value: int) -> None:
        """Commit as the coordinator would: a transient Kafka error is retried."""
        for attempt in range(20):
            try:
                sinks.commit(node, spec(b), b * 1000, [("a", value)])
                return
            except MetadataLostError:
                raise
            except DStreamError:  # e.g. NOT_COORDINATOR while a fresh broker warms up
                if attempt == 19:
                    raise
                time.sleep(0.5)

    old = FleetSinks(settings, app_id, incarnation_fn=lambda: "old-run")
    try:
        retried(old, 5, 1)
        assert old.committed_batches == 1
        # a retry at once through the same producer: its marker may not be readable yet,
        # the sink knows it committed the batch itself
        retried(old, 5, 1)
        assert (old.committed_batches, old.skipped_batches) == (1, 1), "written twice"
    finally:
        old.close()
    # a retry of the same run (a new producer: its init_transactions settles the last one)
    again = FleetSinks(settings, app_id, incarnation_fn=lambda: "old-run")
    try:
        retried(again, 5, 1)
        assert (again.committed_batches, again.skipped_batches) == (0, 1), "already written"
    finally:
        again.close()
    new = FleetSinks(settings, app_id, incarnation_fn=lambda: "new-run")
    try:
        with pytest.raises(
            MetadataLostError, match=r"incarnation old-run, not to this run's new-run"
        ):
            retried(new, 2, 7)  # below the old marker: not skipped
        with pytest.raises(MetadataLostError, match="dstream reset --app-id"):
            retried(new, 9, 7)  # above it: not written either
        assert (new.committed_batches, new.skipped_batches) == (0, 0)
    finally:
        new.close()
    assert [m.value() for m in read_topic(kafka_bootstrap, topic, idle_s=0.5)] == [b"1"]


def test_reset_refuses_while_a_coordinator_leads_unless_forced(
    kafka_bootstrap: str, redis_url: str, redis_client: redis.Redis, app_id: str
) -> None:
    meta = RedisMetaLog(redis_client, app_id)
    lease = meta.acquire_lease("10.0.0.9:7070", 60.0)
    assert lease is not None
    meta.create_incarnation("abc")
    other = RedisMetaLog(redis_client, f"{app_id}-2")  # another app, whose id extends it
    assert other.acquire_lease("10.0.0.8:7070", 60.0) is not None
    env = {
        **os.environ,
        "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
    }

    def reset(*flags: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "ops.cli", "reset", "--app-id", app_id, *flags]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    refused = reset()
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"dstream: app {app_id} is running: coordinator 10.0.0.9:7070 holds its lease (epoch "
        f"{lease.epoch}). Stop the app first (or pass --force if that coordinator is gone)"
    )
    assert meta.incarnation() == "abc", "nothing deleted"
    forced = reset("--force")
    assert forced.returncode == 0, forced.stderr
    assert f"reset app {app_id}: deleted 3 Redis keys" in forced.stdout  # epoch, lease, incarnation
    assert list(redis_client.scan_iter(match=f"dstream:{app_id}:*")) == []
    assert other.leader() is not None, "another app's keys stay"
    redis_client.delete(*redis_client.scan_iter(match=f"dstream:{app_id}-2:*"))
