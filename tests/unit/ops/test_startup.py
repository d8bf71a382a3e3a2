"""The start-up wait's decisions: what to probe, how long to sleep, when to give up, what to say.

No services and no clock: :class:`ops.startup.StartupWait` is driven with the times a
test chooses, the way the I/O shell drives it with ``time.monotonic``.
"""

from __future__ import annotations

import logging

import pytest

from engine import StreamingContext
from ops.config import load_settings
from ops.startup import (
    Backoff,
    Dependency,
    DependencyUnreachable,
    GiveUp,
    Probe,
    Ready,
    Sleep,
    StartupWait,
    app_dependencies,
    needs_kafka,
    needs_redis,
    wait_for_dependencies,
)

KAFKA = Dependency("kafka", "127.0.0.1:9", "metadata request")
REDIS = Dependency("redis", "redis://127.0.0.1:9/0", "PING")


def test_backoff_doubles_from_half_a_second_up_to_its_cap() -> None:
    b = Backoff()
    assert [b.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert Backoff(first_s=1, factor=3, max_s=5).delay(3) == 5


def test_everything_answering_at_once_says_nothing() -> None:
    w = StartupWait([KAFKA, REDIS], bound_s=60, started=0.0)
    step = w.next(0.0)
    assert step == Probe((KAFKA, REDIS), 5.0)
    assert w.tried(KAFKA, True, 0.01) == []
    assert w.tried(REDIS, True, 0.02) == []
    assert w.next(0.02) == Ready()


def test_no_dependencies_is_ready_without_a_probe() -> None:
    assert StartupWait([], bound_s=60, started=0.0).next(0.0) == Ready()


def test_a_silent_dependency_is_reported_once_then_retried_with_backoff() -> None:
    w = StartupWait([KAFKA, REDIS], bound_s=60, started=100.0)
    assert w.next(100.0) == Probe((KAFKA, REDIS), 5.0)
    # one WARNING line naming the address, what was tried and the bound
    (said,) = w.tried(KAFKA, False, 105.0, "Broker transport failure")
    assert said.level == logging.WARNING
    assert said.line == (
        "kafka at 127.0.0.1:9 did not answer (metadata request, 1 try over 5.0 s: Broker "
        "transport failure); retrying with backoff for up to 60 s (DSTREAM_STARTUP_TIMEOUT)"
    )
    assert w.tried(REDIS, True, 105.1) == []
    delays = []
    now = 105.1
    for _ in range(4):  # redis answered: only kafka is probed again, after each backoff
        step = w.next(now)
        assert isinstance(step, Sleep)
        delays.append(step.seconds)
        now += step.seconds
        assert w.next(now) == Probe((KAFKA,), 5.0)
        now += 5.0
        assert w.tried(KAFKA, False, now, "Broker transport failure") == []  # said once
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert w.next(now) == Sleep(8.0)  # the cap
    assert w.next(now + 8.0) == Probe((KAFKA,), 5.0)
    (said,) = w.tried(KAFKA, True, now + 8.1)  # ...and it answers: one INFO line
    assert said.line == "kafka at 127.0.0.1:9 answered after 6 tries (40.7 s)"
    now += 8.1
    assert w.next(now) == Ready()


def test_answering_after_failures_is_said_at_info() -> None:
    w = StartupWait([REDIS], bound_s=60, started=0.0)
    w.next(0.0)
    w.tried(REDIS, False, 0.1, "ConnectionError: refused")
    assert isinstance(w.next(0.1), Sleep)
    w.next(0.6)
    (said,) = w.tried(REDIS, True, 0.7)
    assert said.level == logging.INFO
    assert said.line == "redis at redis://127.0.0.1:9/0 answered after 2 tries (0.7 s)"


def test_the_bound_caps_sleeps_and_tries_then_gives_up_in_one_line() -> None:
    w = StartupWait([KAFKA, REDIS], bound_s=8, started=0.0)
    assert w.next(0.0) == Probe((KAFKA, REDIS), 5.0)
    w.tried(KAFKA, False, 5.0, "Broker transport failure")
    w.tried(REDIS, False, 5.0, "ConnectionError: refused")
    assert w.next(5.0) == Sleep(0.5)
    assert w.next(5.5) == Probe((KAFKA, REDIS), 2.5)  # what is left of the bound
    w.tried(REDIS, False, 5.6, "ConnectionError: refused")  # refused at once
    w.tried(KAFKA, False, 8.0, "Broker transport failure")
    step = w.next(8.0)  # both are reported over the whole wait
    assert step == GiveUp(
        "kafka at 127.0.0.1:9 did not answer (metadata request, 2 tries over 8.0 s: Broker "
        "transport failure); redis at redis://127.0.0.1:9/0 did not answer (PING, 2 tries "
        "over 8.0 s: ConnectionError: refused); gave up after 8 s (DSTREAM_STARTUP_TIMEOUT): "
        "check the address and that the service is up",
        ("kafka", "redis"),
    )
    assert "\n" not in step.line


def test_a_sleep_never_runs_past_the_bound_and_the_last_try_gets_a_floor() -> None:
    w = StartupWait([KAFKA], bound_s=3, started=0.0)
    assert w.next(0.0) == Probe((KAFKA,), 3.0)
    w.tried(KAFKA, False, 2.8, "x")
    assert w.next(2.8) == Sleep(pytest.approx(0.2))
    assert w.next(2.99) == Probe((KAFKA,), 0.5)  # MIN_TRY_S: a live service can answer
    w.tried(KAFKA, False, 3.5, "x")
    assert isinstance(w.next(3.5), GiveUp)


def _nodes(build: str) -> list:  # type: ignore[type-arg]
    ssc = StreamingContext(1.0)
    src = ssc.queue_stream([[("a", 1)]])
    if build == "kafka-in":
        ssc.kafka_stream("t").pprint()
    elif build == "kafka-out":
        src.to_kafka("out")
    elif build == "state":
        src.running_reduce(lambda a, b: a + b).pprint()
    elif build == "redis-out":
        src.to_redis(mode="hash", hash_name="h")
    else:
        src.pprint()
    return list(ssc.nodes)


@pytest.mark.parametrize(
    ("build", "kafka", "redis"),
    [
        ("plain", False, False),
        ("kafka-in", True, False),
        ("kafka-out", True, False),
        ("state", False, True),
        ("redis-out", False, True),
    ],
)
def test_what_a_worker_needs_follows_the_graph(build: str, kafka: bool, redis: bool) -> None:
    nodes = _nodes(build)
    assert needs_kafka(nodes) is kafka
    assert needs_redis(nodes) is redis
    settings = load_settings(kafka_bootstrap="k:1", redis_url="redis://u:pw@r:2/0")
    names = [d.name for d in app_dependencies(settings, nodes, "app", coordinator=False)]
    assert names == [n for n, need in (("kafka", kafka), ("redis", redis)) if need]
    coordinator = app_dependencies(settings, nodes, "app", coordinator=True)
    assert coordinator[-1] == Dependency("redis", "redis://u:***@r:2/0", "PING")  # no password
    assert (coordinator[0] == Dependency("kafka", "k:1", "metadata request")) is kafka


def test_a_dead_letter_topic_makes_kafka_a_dependency() -> None:
    settings = load_settings(dead_letter_topic="dl")
    names = [d.name for d in app_dependencies(settings, _nodes("plain"), "a", coordinator=True)]
    assert names == ["kafka", "redis"]


def test_the_shell_gives_up_on_a_port_nothing_listens_on() -> None:
    """The real probes against closed ports: librdkafka and redis-py, no service needed."""
    from ops.tools.devservices import free_port

    port = free_port()
    settings = load_settings(
        kafka_bootstrap=f"127.0.0.1:{port}",
        redis_url=f"redis://127.0.0.1:{port}/0",
        startup_timeout="1.5s",
    )
    deps = app_dependencies(settings, _nodes("kafka-in"), "a", coordinator=True)
    with pytest.raises(DependencyUnreachable) as err:
        wait_for_dependencies(settings, deps)
    assert err.value.names == ("kafka", "redis")
    line = str(err.value)
    assert f"kafka at 127.0.0.1:{port} did not answer (metadata request" in line
    assert f"redis at redis://127.0.0.1:{port}/0 did not answer (PING" in line
    assert "gave up after 1.5 s" in line


def test_the_startup_timeout_setting_takes_durations_and_must_be_positive() -> None:
    from engine.errors import ConfigError

    assert load_settings().startup_timeout == 60.0
    assert load_settings(startup_timeout="2m").startup_timeout == 120.0
    with pytest.raises(ConfigError, match="startup_timeout"):
        load_settings(startup_timeout=0)


def test_kafka_gone_after_the_wait_is_still_one_line_not_a_kafka_exception() -> None:
    """The input topics' metadata request, past the wait, on a port nothing listens on."""
    from ops.services import topic_partitions
    from ops.tools.devservices import free_port

    port = free_port()
    settings = load_settings(kafka_bootstrap=f"127.0.0.1:{port}")
    with pytest.raises(DependencyUnreachable) as err:
        topic_partitions(settings, ["pv"], timeout=1.0)
    assert str(err.value) == (
        f"kafka at 127.0.0.1:{port} did not answer (metadata request for the input topics, "
        "1 s): Failed to get metadata: Local: Broker transport failure"
    )
    assert err.value.names == ("kafka",)
