"""The producer harness against a real Kafka broker: produce, read back, check every record."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from engine.errors import ServiceError
from ops.produce import ensure_topic, pageview_events, produce_pageviews

pytestmark = pytest.mark.integration

N = 5_000
KEYS = 200


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list[Any]:
    """Read *topic* from the earliest offset until *expected* records or *timeout*."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-produce-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    out: list[Any] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                assert msg.error() is None, msg.error()
                out.append(msg)
        # Anything beyond the expected count would be a duplicate: give it a moment to show.
        out.extend(m for m in consumer.consume(num_messages=1000, timeout=1.0) if not m.error())
    finally:
        consumer.close()
    return out


def check_records(msgs: list[Any], decode: Callable[[bytes], Any], partitions: int) -> None:
    assert len(msgs) == N
    seqs: dict[str, list[int]] = {}
    partition_of: dict[str, int] = {}
    for m in msgs:
        ev = decode(m.value())
        assert set(ev) == {"url", "user", "ts", "seq"}
        assert m.key() == ev["url"].encode()
        assert m.timestamp()[1] == ev["ts"]
        # A url always lands in one partition.
        assert partition_of.setdefault(ev["url"], m.partition()) == m.partition()
        seqs.setdefault(ev["url"], []).append(ev["seq"])
    for url, got in seqs.items():
        # Within a partition Kafka keeps order, so per-key seq is contiguous and in order.
        assert got == list(range(len(got))), url
    assert len(set(partition_of.values())) == partitions
    # Exactly the seeded stream, in per-key order.
    want: dict[str, list[int]] = {}
    for ev in pageview_events(N, KEYS, "zipf", seed=11):
        want.setdefault(ev["url"], []).append(ev["seq"])
    assert seqs == want


def test_produce_5000_at_full_speed_to_three_partitions(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=3)
    result = produce_pageviews(
        kafka_bootstrap, topic, rate=0, count=N, keys=KEYS, key_dist="zipf", seed=11
    )
    assert (result.records, result.errors) == (N, 0)
    assert result.rate > 0
    check_records(consume_all(kafka_bootstrap, topic, N), json.loads, partitions=3)


def test_produce_msgpack_creates_missing_topic(kafka_bootstrap: str) -> None:
    topic = f"produce-msgpack-{uuid.uuid4().hex[:12]}"
    result = produce_pageviews(
        kafka_bootstrap,
        topic,
        rate=0,
        count=N,
        keys=KEYS,
        key_dist="zipf",
        seed=11,
        fmt="msgpack",
        partitions=2,
    )
    assert (result.records, result.errors) == (N, 0)
    assert ensure_topic(kafka_bootstrap, topic, 7) == 2  # existing topic left as it is
    check_records(
        consume_all(kafka_bootstrap, topic, N),
        lambda b: msgpack.unpackb(b, raw=False),
        partitions=2,
    )


def test_paced_run_holds_rate(kafka_bootstrap: str, new_topic: Callable[..., str]) -> None:
    topic = new_topic(partitions=1)
    result = produce_pageviews(kafka_bootstrap, topic, rate=2_000, duration=2.0, keys=10)
    assert result.errors == 0
    assert result.records == 4_000
    assert result.rate == pytest.approx(2_000, rel=0.1)


def test_cli_produce(kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ops.cli import main

    topic = f"produce-cli-{uuid.uuid4().hex[:12]}"
    argv = ["produce", "--topic", topic, "--count", "300", "--rate", "0"]
    argv += ["--partitions", "3", "--bootstrap", kafka_bootstrap, "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"produced 300 records to {topic}" in out
    assert "0 errors" in out


def test_unreachable_broker_is_a_clear_error() -> None:
    with pytest.raises(ServiceError, match="cannot reach Kafka"):
        ensure_topic("127.0.0.1:1", "nowhere", 1, timeout=2.0)
