"""Settings: validated at start-up, Kafka settings passed through, secrets never shown."""

from __future__ import annotations

import json
import logging

import pytest

from engine.errors import ConfigError
from ops.config import load_settings, redact_url


def test_kafka_settings_pass_through_to_librdkafka(monkeypatch) -> None:
    conf = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "svc",
        "sasl.password": "hunter2",
        "ssl.ca.location": "/ca.pem",
    }
    monkeypatch.setenv("DSTREAM_KAFKA_CONFIG", json.dumps(conf))
    monkeypatch.setenv("DSTREAM_KAFKA_BOOTSTRAP", "broker:9093")
    s = load_settings()
    client = s.kafka_client_config(**{"group.id": "g"})
    assert client["bootstrap.servers"] == "broker:9093"
    for k, v in conf.items():
        assert client[k] == v
    assert client["group.id"] == "g"


def test_secrets_are_redacted_wherever_settings_are_shown(monkeypatch, caplog) -> None:
    monkeypatch.setenv(
        "DSTREAM_KAFKA_CONFIG", json.dumps({"sasl.password": "hunter2", "ssl.key.password": "k3y"})
    )
    monkeypatch.setenv("DSTREAM_REDIS_URL", "rediss://app:s3cret@redis:6380/1")
    monkeypatch.setenv("DSTREAM_REDIS_PASSWORD", "p4ss")
    monkeypatch.setenv("DSTREAM_SECRET", "rpc-secret-value")
    s = load_settings()
    shown = json.dumps(s.redacted())
    for secret in ("hunter2", "k3y", "s3cret", "p4ss", "rpc-secret-value"):
        assert secret not in shown
        assert secret not in repr(s) and secret not in str(s)
    assert "rediss://app:***@redis:6380/1" in shown
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("settings: %s", s.redacted())
    assert "hunter2" not in caplog.text


def test_redact_url_keeps_urls_without_password() -> None:
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("DSTREAM_BATCH_INTERVAL", "0", "batch interval"),
        ("DSTREAM_BATCH_INTERVAL", "abc", r"^batch interval \(DSTREAM_BATCH_INTERVAL\): cannot"),
        ("DSTREAM_NUM_PARTITIONS", "0", "at least 1"),
        ("DSTREAM_KAFKA_CONFIG", "{not json", "JSON object"),
        ("DSTREAM_CHECKPOINT_EVERY", "-1", "checkpoint_every"),
    ],
)
def test_bad_values_fail_fast_with_the_value(monkeypatch, var, value, fragment) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=fragment):
        load_settings()


def test_checkpoint_default_is_about_ten_seconds_of_batches() -> None:
    assert load_settings(batch_interval=0.5).checkpoint_every_batches == 20
    assert load_settings(batch_interval=2.0).checkpoint_every_batches == 5
    assert load_settings(checkpoint_every=3).checkpoint_every_batches == 3
