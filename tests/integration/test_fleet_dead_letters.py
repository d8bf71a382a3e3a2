"""Dead letters on a real ``--workers 2`` fleet (issue 3).

Undecodable JSON records and records on which a user ``map`` raises land in the
dead-letter topic with their source coordinates, the operator and the error; the other
records' results are exact (a plain-Python computation over the same input), and
records in = records processed + records dead-lettered.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from tests.apps import dead_letter_app as app
from tests.fleetkit import last_values, read_topic, run_fleet, wait_for

APP = "tests/apps/dead_letter_app.py"
N = 600
KEYS = 7
BAD_JSON_EVERY = 23  # record i with i % 23 == 7 is not valid JSON


def _payload(i: int) -> bytes:
    if i % BAD_JSON_EVERY == 7:
        return b'{"k": "k1", "n": ' + str(i).encode()  # truncated: not JSON
    return json.dumps({"k": f"k{i % KEYS}", "n": i}).encode()


def _produce(bootstrap: str, topic: str) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(N):
        p.produce(topic, _payload(i), key=str(i % 3).encode(), partition=i % 2)
    assert p.flush(30) == 0


def _headers(m: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in (m.headers() or [])}


def test_poison_records_are_dead_lettered_and_the_rest_is_exact(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path
) -> None:
    inp, out, dlq = new_topic(2), new_topic(1), new_topic(1)
    _produce(kafka_bootstrap, inp)
    inputs = read_topic(kafka_bootstrap, inp)
    assert len(inputs) == N

    # plain Python: which records are bad, and the totals of the good ones
    undecodable, raising, expected = {}, {}, collections.defaultdict(lambda: [0, 0])
    for m in inputs:
        coords = (m.topic(), m.partition(), m.offset())
        try:
            event = json.loads(m.value())
        except json.JSONDecodeError:
            undecodable[coords] = m.value()
            continue
        if event["n"] % app.POISON_EVERY == 0:
            raising[coords] = event
            continue
        expected[event["k"]][0] += event["n"]
        expected[event["k"]][1] += 1
    assert undecodable and raising

    env = {
        "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_BATCH_INTERVAL": "0.25",
        "DSTREAM_DEAD_LETTER_TOPIC": dlq,
        "DL_INPUT": inp,
        "DL_OUTPUT": out,
    }
    n_dead = len(undecodable) + len(raising)
    with run_fleet(APP, workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(
            lambda: last_values(read_topic(kafka_bootstrap, out, idle_s=0.5)) == expected,
            90,
            "the totals of the good records",
        )
        wait_for(
            lambda: len(read_topic(kafka_bootstrap, dlq, idle_s=0.5)) >= n_dead,
            60,
            f"{n_dead} dead letters",
        )
        code = fleet.interrupt()
        log = fleet.log
    assert code == 0, log

    dead = read_topic(kafka_bootstrap, dlq)
    by_coords: dict[tuple[str, int, int], tuple[dict[str, str], bytes]] = {}
    for m in dead:
        h = _headers(m)
        coords = (
            h["dstream-source-topic"],
            int(h["dstream-source-partition"]),
            int(h["dstream-source-offset"]),
        )
        assert coords not in by_coords, f"dead-lettered twice: {coords}"
        by_coords[coords] = (h, m.value())
    # exactly the bad records, each once
    assert set(by_coords) == set(undecodable) | set(raising)
    for coords, raw in undecodable.items():
        h, value = by_coords[coords]
        assert value == raw
        assert h["dstream-operator"] == "source#0.decode"
        assert h["dstream-error"], h
    for coords, event in raising.items():
        h, value = by_coords[coords]
        assert json.loads(value) == event
        assert h["dstream-operator"] == "map#1"
        assert h["dstream-error"] == f"ValueError: poison record n={event['n']}"

    # accounting: records in = records processed + records dead-lettered
    processed = sum(
        count for _total, count in last_values(read_topic(kafka_bootstrap, out)).values()
    )
    assert N == len(inputs) == processed + len(dead)
