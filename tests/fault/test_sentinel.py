"""Redis behind Sentinel: the primary is killed mid-stream, a replica takes over, no loss.

A primary, one replica (``--replicaof``) and one sentinel (quorum 1, down after 1 s), all
Debian's ``redis-server`` on free loopback ports. The fleet gets only the Sentinel URL
(``redis+sentinel://host:port/<master>/0``); its metadata log, checkpoints and Redis sink
follow the failover, and the Kafka and Redis outputs equal the input counts exactly.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from redis.sentinel import Sentinel

from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from tests.fault.scenario import APP, check_exactly_once
from tests.fleetkit import fleet_env, read_topic, run_fleet, wait_for

MASTER = "dstream"


def _server(tmp: Path, port: int, *args: str) -> subprocess.Popen[bytes]:
    tmp.mkdir(parents=True, exist_ok=True)
    with (tmp / "log").open("wb") as log:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = redis_lib.Redis(port=port, socket_timeout=1)
    wait_for(lambda: _pings(client), 10, f"redis on port {port}", every=0.05)
    return proc


def _pings(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.ConnectionError:
        return False


def _replicas(sentinel: redis_lib.Redis) -> int:
    try:
        return len(sentinel.sentinel_slaves(MASTER))
    except redis_lib.RedisError:
        return 0


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[dict[str, object]]:
    """Primary + replica + sentinel; yields their ports, the primary's process and the URL."""
    primary, replica, sport = free_port(), free_port(), free_port()
    durable = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "")
    procs = [_server(tmp_path / "primary", primary, *durable)]
    procs.append(
        _server(tmp_path / "replica", replica, *durable, "--replicaof", "127.0.0.1", str(primary))
    )
    conf = tmp_path / "sentinel" / "sentinel.conf"
    conf.parent.mkdir()
    conf.write_text(
        f"sentinel monitor {MASTER} 127.0.0.1 {primary} 1\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 5000\n"
    )
    procs.append(_sentinel(conf, sport))
    sentinel = redis_lib.Redis(port=sport, socket_timeout=1, decode_responses=True)
    wait_for(lambda: _replicas(sentinel) == 1, 20, "the sentinel to see the replica", every=0.2)
    try:
        yield {
            "url": f"redis+sentinel://127.0.0.1:{sport}/{MASTER}/0",
            "primary": procs[0],
            "primary_port": primary,
            "replica_port": replica,
            "sentinel": sentinel,
            "sentinel_port": sport,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _sentinel(conf: Path, port: int) -> subprocess.Popen[bytes]:
    with (conf.parent / "log").open("wb") as log:
        proc = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel", "--port", str(port), "--bind", "127.0.0.1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = redis_lib.Redis(port=port, socket_timeout=1)
    wait_for(lambda: _pings(client), 10, "the sentinel", every=0.05)
    return proc


def test_fleet_follows_a_sentinel_failover_exactly_once(
    sentinel_redis: dict[str, object],
    kafka_bootstrap: str,
    app_id: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    url = str(sentinel_redis["url"])
    sentinel = sentinel_redis["sentinel"]
    assert isinstance(sentinel, redis_lib.Redis)
    primary = sentinel_redis["primary"]
    assert isinstance(primary, subprocess.Popen)
    inp, out = new_topic(4), new_topic(1)
    env = fleet_env(
        kafka_bootstrap,
        url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL="0.3",
        DSTREAM_CHECKPOINT_EVERY="3",
    )
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=1000, keys=30, seed=31)
    feeding = threading.Thread(
        target=produce_pageviews,
        args=(kafka_bootstrap, inp),
        kwargs={"rate": 800, "duration": 5.0, "keys": 30, "seed": 32},
    )
    with run_fleet(APP, workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(lambda: len(read_topic(kafka_bootstrap, out, idle_s=0.3)) > 0, 60, "first output")
        feeding.start()
        direct = redis_lib.Redis(port=int(str(sentinel_redis["primary_port"])))

        def waited() -> bool:
            stats = direct.info("commandstats")
            return int(stats.get("cmdstat_wait", {}).get("calls", 0)) > 0

        try:
            wait_for(waited, 15, "metadata writes to WAIT for the replica", every=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}: {direct.info('replication')}\n{fleet.log}") from None
        os.kill(primary.pid, signal.SIGKILL)
        primary.wait(10)
        killed = time.monotonic()
        replica = int(str(sentinel_redis["replica_port"]))
        wait_for(
            lambda: int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1]) == replica,
            20,
            "the sentinel to promote the replica",
            every=0.2,
        )
        promoted_s = time.monotonic() - killed
        feeding.join()
        expected = collections.Counter(
            json.loads(m.value())["url"] for m in read_topic(kafka_bootstrap, inp, idle_s=0.3)
        )
        last: dict[str, int] = {}

        def caught_up() -> bool:
            last.clear()
            for m in read_topic(kafka_bootstrap, out, idle_s=0.3):
                k = json.loads(m.key())
                last[k] = max(last.get(k, 0), json.loads(m.value()))
            return last == dict(expected)

        try:
            wait_for(caught_up, 60, "the output to catch up with the input", every=1.0)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{fleet.log[-6000:]}") from None
        fleet.interrupt()
        (tmp_path / "fleet.txt").write_text(fleet.log)
    print(f"sentinel promoted the replica {promoted_s:.1f} s after the primary was killed")
    check_exactly_once(read_topic(kafka_bootstrap, out), expected)
    port = int(str(sentinel_redis["sentinel_port"]))
    master = Sentinel([("127.0.0.1", port)], socket_timeout=2).master_for(MASTER)
    stored = {
        k.decode(): json.loads(v) for k, v in master.hgetall(f"dstream:{app_id}:counts").items()
    }
    assert stored == dict(expected), "the Redis output differs from the input counts"
