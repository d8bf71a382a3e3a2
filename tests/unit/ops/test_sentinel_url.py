"""Sentinel URLs and the topics a coordinator makes sure of (no services)."""

from __future__ import annotations

import pytest

from engine import StreamingContext
from engine.errors import ConfigError
from ops.config import Settings
from ops.redis_sentinel import SentinelTarget, parse_sentinel_url
from ops.services import redis_client
from ops.topics import output_topics


def test_sentinel_url_with_password_hosts_master_and_db() -> None:
    got = parse_sentinel_url("redis+sentinel://:s%40cret@10.0.0.1:26379,sent-b:26380/mymaster/3")
    assert got == SentinelTarget(
        sentinels=[("10.0.0.1", 26379), ("sent-b", 26380)],
        master="mymaster",
        db=3,
        password="s@cret",
    )


def test_sentinel_url_defaults_and_tls() -> None:
    got = parse_sentinel_url("rediss+sentinel://user:pw@h:1/m")
    assert (got.db, got.tls, got.username, got.password) == (0, True, "user", "pw")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://h:1", "name the master"),
        ("redis+sentinel://h/m/0", "not host:port"),
        ("redis+sentinel://h:1/m/x", "not a number"),
        ("redis://h:1/0", "not a Sentinel URL"),
    ],
)
def test_bad_sentinel_urls_are_clear_and_redacted(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_sentinel_url(url)
    with pytest.raises(ConfigError) as e:
        parse_sentinel_url("redis+sentinel://:hunter2@h:1/m/x")
    assert "hunter2" not in str(e.value)


def test_redis_client_of_a_sentinel_url_waits_for_replicas() -> None:
    s = Settings(redis_url="redis+sentinel://:pw@127.0.0.1:1/m/2", redis_wait_timeout=0.25)
    client = redis_client(s)  # no connection is made until a command
    assert client.wait_timeout_ms == 250
    assert client.connection_pool.service_name == "m"
    assert client.connection_pool.connection_kwargs["db"] == 2
    assert client.connection_pool.connection_kwargs["password"] == "pw"


def _app(kafka_out: bool, kafka_in: bool) -> StreamingContext:
    ssc = StreamingContext(1.0)
    src = ssc.kafka_stream("in") if kafka_in else ssc.queue_stream([[1]])
    if kafka_out:
        src.to_kafka("out-b")
        src.map(lambda x: x).to_kafka("out-a")
    else:
        src.to_redis(mode="hash", hash_name="h")
    return ssc


def test_output_topics_are_the_kafka_outputs_and_the_dead_letters() -> None:
    s = Settings()
    assert output_topics(_app(True, True).nodes, s, "app") == ["app-dead-letters", "out-a", "out-b"]
    assert output_topics(_app(False, True).nodes, s, "app") == ["app-dead-letters"]
    assert output_topics(_app(False, False).nodes, s, "app") == []
    named = Settings(dead_letter_topic="dlq")
    assert output_topics(_app(False, False).nodes, named, "app") == ["dlq"]
