"""The producer harness against a real Kafka broker: produce, read back, check every record."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from engine.errors import ConfigError, ServiceError
from ops.tools.produce import ensure_topic, pageview_events, produce_pageviews

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
    argv += ["--partitions", "3", "--kafka-bootstrap", kafka_bootstrap, "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"produced 300 records to {topic}" in out
    assert "0 errors" in out


def test_two_processes_split_the_urls_and_send_the_stream_exactly_once(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=3)
    result = produce_pageviews(
        kafka_bootstrap, topic, rate=0, count=N, keys=KEYS, key_dist="zipf", seed=11, procs=2
    )
    assert (result.records, result.errors) == (N, 0)
    # Process i owns the urls /page/k with k % 2 == i: it sent exactly their events.
    owned = [0, 0]
    for ev in pageview_events(N, KEYS, "zipf", seed=11):
        owned[int(ev["url"].removeprefix("/page/")) % 2] += 1
    assert result.per_process == tuple(owned)
    assert min(owned) > 0
    # Exactly N records, per-url seq contiguous from 0 and in order, the seeded stream.
    check_records(consume_all(kafka_bootstrap, topic, N), json.loads, partitions=3)


def test_two_processes_hold_a_paced_rate(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=2)
    result = produce_pageviews(
        kafka_bootstrap, topic, rate=4_000, duration=2.0, keys=10, procs=2, fmt="msgpack"
    )
    assert (result.records, result.errors) == (8_000, 0)
    assert len(result.per_process) == 2
    assert all(n > 0 for n in result.per_process)
    assert result.rate == pytest.approx(4_000, rel=0.1)
    assert sum(result.per_second) == 8_000
    seqs: dict[str, list[int]] = {}
    for m in consume_all(kafka_bootstrap, topic, 8_000):
        ev = msgpack.unpackb(m.value(), raw=False)
        seqs.setdefault(ev["url"], []).append(ev["seq"])
    assert sum(len(s) for s in seqs.values()) == 8_000
    assert len(seqs) == 10
    for url, got in seqs.items():
        assert got == list(range(len(got))), url


def test_cli_produce_with_two_processes(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from ops.cli import main

    topic = f"produce-cli2-{uuid.uuid4().hex[:12]}"
    argv = ["produce", "--topic", topic, "--count", "3000", "--rate", "0", "--procs", "2"]
    argv += ["--keys", "50", "--partitions", "4", "--kafka-bootstrap", kafka_bootstrap]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # one summary line for both processes
    assert out[0].startswith(f"produced 3000 records to {topic} in ")
    assert out[0].endswith("(target max), 0 errors")
    msgs = consume_all(kafka_bootstrap, topic, 3000)
    assert len(msgs) == 3000
    seqs: dict[str, list[int]] = {}
    for m in msgs:
        ev = json.loads(m.value())
        seqs.setdefault(ev["url"], []).append(ev["seq"])
    assert all(got == list(range(len(got))) for got in seqs.values())


def test_a_failing_child_process_is_reported(kafka_bootstrap: str) -> None:
    topic = f"produce-bad-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="invalid Kafka producer configuration"):
        produce_pageviews(
            kafka_bootstrap,
            topic,
            rate=0,
            count=100,
            partitions=1,
            procs=2,
            extra_config={"linger.ms": "not-a-number"},
        )
    assert time.monotonic() - t0 < 30


def test_unreachable_broker_is_a_clear_error() -> None:
    with pytest.raises(ServiceError, match="cannot reach Kafka"):
        ensure_topic("127.0.0.1:1", "nowhere", 1, timeout=2.0)
