"""Failing dependencies: a Redis restart and a Kafka broker restart mid-run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import redis as redis_lib

from ops.tools.devservices import KafkaHandle, free_port, start_kafka
from tests.fault.scenario import run_scenario
from tests.fleetkit import Fleet


def _start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    """A Redis with an append-only file: a restart keeps the fleet's metadata."""
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis_lib.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis_lib.ConnectionError:
            time.sleep(0.05)
    raise AssertionError("redis did not start")


@pytest.mark.timeout(300)
def test_redis_restart_mid_run(kafka_bootstrap, app_id, new_topic, tmp_path):
    port = free_port()
    procs = [_start_redis(tmp_path, port)]

    def fault(fleet: Fleet, status_port: int) -> None:
        procs[0].kill()
        procs[0].wait()
        time.sleep(2.0)  # down for a few batches
        procs.append(_start_redis(tmp_path, port))

    try:
        res = run_scenario(
            kafka=kafka_bootstrap,
            redis_url=f"redis://127.0.0.1:{port}/0",
            app_id=app_id,
            new_topic=new_topic,
            tmp=tmp_path,
            fault=fault,
        )
    finally:
        for p in procs:
            p.kill()
            p.wait()
    log = res["log"]
    assert "redis unavailable" in log and "redis available again" in log


@pytest.fixture
def private_kafka(tmp_path: Path):
    home = tmp_path / "kafka"
    handles: list[KafkaHandle] = [start_kafka(home, free_port(), free_port())]
    yield handles
    for h in handles:
        h.stop()


@pytest.mark.timeout(420)
def test_kafka_broker_restart_mid_run(private_kafka, redis_url, app_id, tmp_path):
    from confluent_kafka.admin import AdminClient, NewTopic

    kafka = private_kafka[0]
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    names = iter(["in", "out"])

    def new_topic(partitions: int = 1) -> str:
        name = f"{app_id}-{next(names)}"
        admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)
        time.sleep(0.5)
        return name

    def fault(fleet: Fleet, status_port: int) -> None:
        k = private_kafka[-1]
        k.stop()
        time.sleep(2.0)
        private_kafka.append(start_kafka(k.home, k.port, k.controller_port, fresh=False))

    res = run_scenario(
        kafka=kafka.bootstrap,
        redis_url=redis_url,
        app_id=app_id,
        new_topic=new_topic,
        tmp=tmp_path,
        fault=fault,
        catch_up_s=180,
    )
    assert res["expected"]
