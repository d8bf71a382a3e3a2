"""Real Kafka and Redis: `dstream dev` life cycle, and the session fixtures' services."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from engine.errors import ServiceError
from ops.tools import devservices as ds


def _dstream(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DSTREAM_KAFKA_BOOTSTRAP", "DSTREAM_REDIS_URL")
    }
    env["DSTREAM_DEV_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "dev", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=150,
    )


def _consume(bootstrap: str, topic: str, partitions: int, want: int, **conf: str) -> list[bytes]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False, **conf}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while len(got) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
        # a little longer: nothing more (aborted records) must show up
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
    finally:
        consumer.close()
    return got


def test_dev_up_twice_env_status_down(tmp_path: Path) -> None:
    home = tmp_path / "devhome"
    kp, cp, rp = ds.free_port(), ds.free_port(), ds.free_port()
    ports = ["--kafka-port", str(kp), "--controller-port", str(cp), "--redis-port", str(rp)]
    try:
        t0 = time.monotonic()
        first = _dstream(home, "up", *ports)
        assert first.returncode == 0, first.stderr
        print(f"dev up took {time.monotonic() - t0:.1f} s")
        state = ds.load_state(home)
        assert state.kafka is not None
        assert state.redis is not None
        assert state.kafka.bootstrap == f"127.0.0.1:{kp}"
        assert (home / "kafka" / "kafka.pid").read_text().strip() == str(state.kafka.pid)
        assert (home / "redis" / "redis.pid").read_text().strip() == str(state.redis.pid)

        t1 = time.monotonic()
        second = _dstream(home, "up", *ports)
        assert second.returncode == 0, second.stderr
        assert time.monotonic() - t1 < 10
        assert ds.load_state(home) == state  # same processes, nothing restarted
        assert f"127.0.0.1:{kp}" in second.stdout
        assert "running" in second.stdout

        env = _dstream(home, "env")
        assert env.returncode == 0, env.stderr
        assert env.stdout.splitlines() == [
            f"export DSTREAM_KAFKA_BOOTSTRAP=127.0.0.1:{kp}",
            f"export DSTREAM_REDIS_URL=redis://127.0.0.1:{rp}/0",
        ]
        assert ds.discovered_env(home) == {
            "kafka_bootstrap": f"127.0.0.1:{kp}",
            "redis_url": f"redis://127.0.0.1:{rp}/0",
        }
        st = _dstream(home, "status")
        assert st.returncode == 0
        assert st.stdout.count("running") == 2

        md = AdminClient({"bootstrap.servers": state.kafka.bootstrap}).list_topics(timeout=10)
        assert list(md.brokers) == [1]
        client = redis.Redis.from_url(state.redis.url)
        assert client.ping()
        client.close()
    finally:
        down = _dstream(home, "down")
    assert down.returncode == 0, down.stderr
    assert "kafka" in down.stdout
    assert "redis" in down.stdout
    assert not state.kafka.is_running()
    assert not state.redis.is_running()
    for port in (kp, cp, rp):
        assert not ds.port_in_use(port)
    assert not (home / "kafka" / "kafka.pid").exists()
    assert not (home / "redis" / "redis.pid").exists()
    assert not (home / "kafka" / "data").exists()
    assert ds.discovered_env(home) == {}
    again = _dstream(home, "down")
    assert again.returncode == 0
    assert "nothing was running" in again.stdout


def test_dev_up_refuses_port_in_use_by_a_stranger(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        res = _dstream(
            tmp_path, "up", "--kafka-port", str(busy), "--redis-port", str(ds.free_port())
        )
    assert res.returncode == 1
    assert res.stderr.startswith(f"dstream: Kafka port {busy} on 127.0.0.1 is already in use")
    assert ds.discovered_env(tmp_path) == {}


def test_broker_start_timeout_reports_log_tail(tmp_path: Path) -> None:
    with pytest.raises(ServiceError) as info:
        ds.start_kafka(tmp_path, ds.free_port(), ds.free_port(), timeout=0.01)
    message = str(info.value)
    first, _, tail = message.partition("\n")
    assert first.startswith("Kafka did not answer on 127.0.0.1:")
    assert "within 0 s; last lines of" in first
    assert tail  # the broker log's tail follows
    assert not (tmp_path / "kafka.pid").exists()


def test_kafka_produce_consume_round_trip(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(10):
        producer.produce(topic, value=f"v{i}".encode(), key=f"k{i}".encode())
    assert producer.flush(10) == 0
    got = _consume(kafka_bootstrap, topic, 2, 10)
    assert sorted(got) == sorted(f"v{i}".encode() for i in range(10))


def test_kafka_transactions_read_committed(
    kafka_bootstrap: str, new_topic: Callable[..., str], app_id: str
) -> None:
    topic = new_topic()
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{app_id}-0"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"committed-1")
    producer.produce(topic, value=b"committed-2")
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"aborted")
    assert producer.flush(10) == 0  # on the broker, so the abort marker has work to do
    producer.abort_transaction(30)

    committed = _consume(kafka_bootstrap, topic, 1, 2, **{"isolation.level": "read_committed"})
    assert committed == [b"committed-1", b"committed-2"]
    everything = _consume(kafka_bootstrap, topic, 1, 3, **{"isolation.level": "read_uncommitted"})
    assert everything == [b"committed-1", b"committed-2", b"aborted"]


def test_kafka_zombie_producer_is_fenced(
    kafka_bootstrap: str, new_topic: Callable[..., str], app_id: str
) -> None:
    topic = new_topic()
    conf = {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{app_id}-fence"}
    old = Producer(conf)
    old.init_transactions(30)
    new = Producer(conf)
    new.init_transactions(30)
    old.begin_transaction()
    old.produce(topic, value=b"zombie")
    with pytest.raises(KafkaException):
        old.commit_transaction(10)


def test_new_topics_are_unique(new_topic: Callable[..., str]) -> None:
    a, b = new_topic(), new_topic(3)
    assert a != b


def test_redis_ping_and_app_prefix(redis_client: redis.Redis, app_id: str) -> None:
    assert redis_client.ping()
    redis_client.set(f"{app_id}:k", b"v")
    assert redis_client.get(f"{app_id}:k") == b"v"


def test_integration_marker_applied(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("integration") is not None
