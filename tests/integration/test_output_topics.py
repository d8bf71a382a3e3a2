"""Output topics exist before batch 0: created by the coordinator, or a clear error at start.

The session's broker creates no topic on first use (``auto.create.topics.enable=false``,
:data:`ops.tools.devservices.TEST_BROKER_PROPERTIES`), as production brokers run.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from ops.tools.produce import produce_pageviews
from tests.fleetkit import ROOT, fleet_env, last_values, read_topic, run_fleet, wait_for

APP = "examples/pageviews.py"


def _partitions(bootstrap: str, topic: str) -> int | None:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    tm = md.topics.get(topic)
    return None if tm is None or tm.error is not None else len(tm.partitions)


def test_broker_does_not_create_topics(kafka_bootstrap: str) -> None:
    from confluent_kafka.admin import ConfigResource

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    node = next(iter(admin.list_topics(timeout=10).brokers))
    res = ConfigResource(ConfigResource.Type.BROKER, str(node))
    conf = admin.describe_configs([res])[res].result(30)
    assert conf["auto.create.topics.enable"].value == "false"


def test_missing_output_topic_is_created_and_output_is_exact(
    kafka_bootstrap: str,
    redis_url: str,
    app_id: str,
    new_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    inp = new_topic(2)
    out = f"{app_id}-counts"
    assert _partitions(kafka_bootstrap, out) is None
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=600, keys=20, seed=5)
    expected = collections.Counter(
        json.loads(m.value())["url"] for m in read_topic(kafka_bootstrap, inp, idle_s=0.3)
    )
    assert sum(expected.values()) == 600
    env = fleet_env(
        kafka_bootstrap,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL="0.5",
        DSTREAM_OUTPUT_TOPIC_PARTITIONS="2",
    )
    with run_fleet(APP, workers=1, env=env, tmp=tmp_path) as fleet:
        try:
            wait_for(
                lambda: last_values(read_topic(kafka_bootstrap, out, idle_s=0.3)) == expected,
                60,
                "the output to equal the input counts",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{fleet.log[-4000:]}") from None
    assert _partitions(kafka_bootstrap, out) == 2
    assert _partitions(kafka_bootstrap, f"{app_id}-dead-letters") == 2


def _coordinator(
    kafka: str, redis_url: str, app_id: str, inp: str, out: str, **extra: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {
        **os.environ,
        **fleet_env(kafka, redis_url, app_id, (inp, out), DSTREAM_SECRET=uuid.uuid4().hex),
        **extra,
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "coordinator", "--app", APP, "--http-port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc, time.monotonic() - t0


@pytest.mark.parametrize(
    ("name", "extra", "advice"),
    [
        (
            "replication",
            {"DSTREAM_OUTPUT_TOPIC_REPLICATION": "3"},
            "DSTREAM_OUTPUT_TOPIC_REPLICATION",
        ),
        ("invalid-name", {}, "valid topic name"),
    ],
)
def test_refused_creation_stops_the_coordinator_with_one_line(
    kafka_bootstrap: str,
    redis_url: str,
    app_id: str,
    new_topic: Callable[..., str],
    name: str,
    extra: dict[str, str],
    advice: str,
) -> None:
    inp, dlq = new_topic(1), new_topic(1)
    out = f"{app_id}-out" if name == "replication" else f"{app_id} out!"
    proc, took = _coordinator(
        kafka_bootstrap, redis_url, app_id, inp, out, DSTREAM_DEAD_LETTER_TOPIC=dlq, **extra
    )
    assert proc.returncode != 0
    assert took < 30
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if out in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"dstream: cannot create output topic {out!r}")
    assert advice in errors[0]
    assert _partitions(kafka_bootstrap, out) is None
