"""librdkafka's lines go through ``dstream.kafka``, once per kind and window, not per reconnect."""

from __future__ import annotations

import logging
import time

import pytest

from ops.config import load_settings
from ops.kafka_log import KAFKA_LOGGER, RepeatFilter, kafka_logger

FAIL = (
    "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused "
    "(after {ms}ms in state CONNECT)"
)


def _record(fac: str, text: str, client: str = "rdkafka#producer-1") -> logging.LogRecord:
    """A record as confluent-kafka logs it: ``logger.log(level, "%s [%s] %s", fac, name, buf)``."""
    return logging.LogRecord(
        KAFKA_LOGGER, logging.ERROR, "", 0, "%s [%s] %s", (fac, client, text), None
    )


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_first_of_a_kind_passes_at_warning_and_repeats_are_counted() -> None:
    clock = _Clock()
    f = RepeatFilter(window_s=60, clock=clock)
    first = _record("FAIL", FAIL.format(ms=0))
    assert f.filter(first)
    assert first.levelno == logging.WARNING
    assert first.levelname == "WARNING"
    passed = 0
    for i in range(500):  # librdkafka's ~20 reconnects a second, from three clients
        clock.now = i * 0.05
        rec = _record("FAIL", FAIL.format(ms=i % 7), f"rdkafka#consumer-{i % 3}")
        passed += f.filter(rec)
    assert passed == 0
    assert f.held_back == 500
    clock.now = 60.0  # the window is over: one line again, saying how many were held back
    again = _record("FAIL", FAIL.format(ms=3))
    assert f.filter(again)
    assert again.getMessage().endswith("(repeated 500 times in the last 60 s)")
    assert "Connection refused" in again.getMessage()


def test_other_kinds_and_levels_are_left_alone() -> None:
    f = RepeatFilter(window_s=60, clock=_Clock())
    assert f.filter(_record("FAIL", FAIL.format(ms=0)))
    other_broker = _record("FAIL", FAIL.format(ms=0).replace("127.0.0.1:9", "10.0.0.2:9092"))
    assert f.filter(other_broker)  # another address is another kind
    auth = _record("SASL", "SASL authentication error: Authentication failed")
    assert f.filter(auth)
    assert auth.levelno == logging.ERROR  # not a retried connection failure: stays ERROR
    plain = logging.LogRecord(KAFKA_LOGGER, logging.INFO, "", 0, "100% done", None, None)
    assert f.filter(plain)
    assert not f.filter(
        logging.LogRecord(KAFKA_LOGGER, logging.INFO, "", 0, "100% done", None, None)
    )


def test_every_client_config_logs_through_the_filtered_logger() -> None:
    conf = load_settings().kafka_client_config(**{"group.id": "g"})
    assert conf["logger"] is logging.getLogger(KAFKA_LOGGER)
    assert conf["group.id"] == "g"
    assert sum(isinstance(x, RepeatFilter) for x in kafka_logger().filters) == 1  # idempotent


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_real_client_on_a_closed_port_logs_one_line_not_dozens() -> None:
    """librdkafka against a port nothing listens on (no service needed)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient

    from ops.tools.devservices import free_port

    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    logger = kafka_logger()
    for f in list(logger.filters):  # a fresh window: earlier tests may have seen this kind
        if isinstance(f, RepeatFilter):
            logger.removeFilter(f)
    handler = _Collect()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        t0 = time.monotonic()
        admin = AdminClient(settings.kafka_client_config())
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=1.5)
        admin.poll(0)  # an admin client's lines are handed over when it is polled
        c = Consumer(settings.kafka_client_config(**{"group.id": "g"}))
        with pytest.raises(KafkaException):
            c.get_watermark_offsets(TopicPartition("t", 0), timeout=1.5)
        c.poll(0)
        c.close()
        assert time.monotonic() - t0 < 10
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    fails = [r for r in handler.records if r.args and r.args[0] == "FAIL"]  # type: ignore[index]
    held = next(f for f in logger.filters if isinstance(f, RepeatFilter)).held_back
    assert len(fails) == 1, [r.getMessage() for r in handler.records]
    assert fails[0].levelno == logging.WARNING
    assert held >= 10  # librdkafka did try that often: the lines were held back
