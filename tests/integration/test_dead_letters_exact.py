"""Exact dead letters on a real fleet (issue 13): once per record, never a wedge.

Dead letters are committed by the coordinator, once per batch, in a Kafka transaction; a
read_committed consumer of the dead-letter topic counts exactly one letter per bad
record (no duplicates from retries, speculative copies, recomputations or a worker killed
mid-stream), the coordinator's ``dstream_dead_lettered_records_total`` equals that count,
and the good records' output equals a plain-Python computation. A 5 MB undecodable record
is dead-lettered truncated (it would be refused by the broker) and the fleet goes on; an
output value JSON cannot encode is an encode dead letter, the rest of its batch commits.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from ops.tools.devservices import free_port
from ops.tools.verify import check_dead_letters
from tests.apps import dead_letter_exact_app as app
from tests.fleetkit import ROOT, Fleet, fleet_env, read_topic, role_pids, run_fleet, wait_for

APP = "tests/apps/dead_letter_exact_app.py"
PARTS = 3
BIG = 5 * 1024 * 1024
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _big_value() -> bytes:
    head = b"\xff not json "
    return head + bytes(i % 251 for i in range(BIG - len(head)))


def _produce(bootstrap: str, topic: str, lo: int, hi: int, big_at: int | None = None) -> None:
    p = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "message.max.bytes": BIG * 2}
    )
    for i in range(lo, hi):
        if i == big_at:
            p.produce(topic, _big_value(), partition=1)
        p.produce(topic, json.dumps({"k": f"k{i % 5}", "n": i}).encode(), partition=i % PARTS)
    assert p.flush(30) == 0


def _headers(m: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in (m.headers() or [])}


def _metric(port: int, name: str) -> int:
    """The sum of the coordinator's samples of *name* (all labels)."""
    with _OPENER.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(
        sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name
        )
    )


def _dead_lettered_metric(port: int) -> int:
    return _metric(port, "dstream_dead_lettered_records_total")


def _env(
    kafka: str, redis_url: str, app_id: str, inp: str, out: str, dlq: str, port: int, **extra: str
) -> dict[str, str]:
    return fleet_env(
        kafka,
        redis_url,
        app_id,
        DSTREAM_BATCH_INTERVAL="0.5",
        DSTREAM_DEAD_LETTER_TOPIC=dlq,
        DSTREAM_HTTP_PORT=str(port),
        DLX_INPUT=inp,
        DLX_OUTPUT=out,
        **extra,
    )


def _stop(fleet: Fleet) -> None:
    code = fleet.interrupt()
    assert code == 0, fleet.log


def test_big_poison_unencodable_records_under_a_worker_kill(
    kafka_bootstrap: str,
    redis_url: str,
    app_id: str,
    new_topic: Any,
    tmp_path: Path,
) -> None:
    n = 3000
    inp = new_topic(PARTS, {"max.message.bytes": str(BIG * 2)})
    out, dlq = new_topic(1), new_topic(1)
    _produce(kafka_bootstrap, inp, 0, n // 2, big_at=700)
    port = free_port()
    env = _env(kafka_bootstrap, redis_url, app_id, inp, out, dlq, port)
    with run_fleet(APP, workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(lambda: read_topic(kafka_bootstrap, out, idle_s=0.3), 60, "first output")
        os.kill(role_pids(fleet, "worker")[0], signal.SIGKILL)  # mid-stream
        _produce(kafka_bootstrap, inp, n // 2, n)
        inputs = read_topic(kafka_bootstrap, inp)
        assert len(inputs) == n + 1

        # plain Python: what each input record becomes
        expected: collections.Counter[tuple[str, int]] = collections.Counter()
        poison, unencodable, undecodable = {}, collections.Counter(), {}
        for m in inputs:
            coords = (m.topic(), m.partition(), m.offset())
            try:
                event = json.loads(m.value())
            except ValueError:
                undecodable[coords] = m.value()
                continue
            if event["n"] % app.POISON_EVERY == 0:
                poison[coords] = event
            elif event["n"] % app.COMPLEX_EVERY == 1:
                unencodable[json.dumps([event["k"], repr(complex(event["n"], 1))])] += 1
            else:
                expected[(event["k"], event["n"])] += 1
        n_dead = len(poison) + sum(unencodable.values()) + len(undecodable)
        assert len(undecodable) == 1

        def output() -> collections.Counter[tuple[str, int]]:
            msgs = read_topic(kafka_bootstrap, out, idle_s=0.5)
            return collections.Counter((json.loads(m.key()), json.loads(m.value())) for m in msgs)

        wait_for(lambda: output() == expected, 90, "the exact output of the good records")
        wait_for(
            lambda: len(read_topic(kafka_bootstrap, dlq, idle_s=0.5)) >= n_dead,
            60,
            f"{n_dead} dead letters",
        )
        time.sleep(1.5)  # a duplicate would land by now
        dead = read_topic(kafka_bootstrap, dlq)
        assert _dead_lettered_metric(port) == len(dead)
        assert "starting a new one" in fleet.log, "the killed worker was not replaced"
        _stop(fleet)

    assert len(dead) == n_dead
    by_coords: dict[tuple[str, int, int], tuple[dict[str, str], bytes]] = {}
    encode_letters: collections.Counter[str] = collections.Counter()
    for m in dead:
        h = _headers(m)
        assert int(h["dstream-batch"]) >= 0 and h["dstream-error"]
        if h["dstream-operator"].endswith(".encode"):
            assert h["dstream-error"] == "TypeError: cannot encode complex as JSON"
            encode_letters[m.value().decode()] += 1
            continue
        coords = (
            h["dstream-source-topic"],
            int(h["dstream-source-partition"]),
            int(h["dstream-source-offset"]),
        )
        assert coords not in by_coords, f"dead-lettered twice: {coords}"
        by_coords[coords] = (h, m.value())
    assert set(by_coords) == set(poison) | set(undecodable)
    assert encode_letters == unencodable
    for coords, event in poison.items():
        h, value = by_coords[coords]
        assert json.loads(value) == event
        assert h["dstream-error"] == f"ValueError: poison record n={event['n']}"
    ((coords, raw),) = undecodable.items()
    h, value = by_coords[coords]
    assert h["dstream-operator"].endswith(".decode")
    assert h["dstream-truncated"] == "true" and int(h["dstream-size"]) == len(raw) == BIG
    assert value == raw[:1024]
    # accounting: records in = records out + dead-lettered
    assert len(inputs) == sum(expected.values()) + len(dead)

    # dstream verify's dead-letter check agrees: counted per reason, none twice
    report, dups = check_dead_letters(dead, inp, out)
    assert dups == []
    assert report.by_reason == {
        "decode": 1,
        "user": len(poison),
        "encode": sum(unencodable.values()),
    }
    assert report.from_input + report.encode == n_dead == report.total
    assert report.decode == 1

    # and `dstream verify` end to end: its reference dead-letters what the fleet did
    res = subprocess.run(
        [sys.executable, "-m", "ops.cli", "verify", "--app", APP, "--dead-letters", dlq],
        cwd=ROOT,
        env={
            **os.environ,
            "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "DLX_INPUT": inp,
            "DLX_OUTPUT": out,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verify OK" in res.stdout and f"{n_dead} dead letters" in res.stdout, res.stdout


def test_a_function_that_always_raises_gives_one_letter_per_record(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    n = 3000
    inp, out, dlq = new_topic(PARTS), new_topic(1), new_topic(1)
    _produce(kafka_bootstrap, inp, 0, n)
    port = free_port()
    env = _env(
        kafka_bootstrap,
        redis_url,
        app_id,
        inp,
        out,
        dlq,
        port,
        DLX_ALWAYS_RAISE="1",
        # one slow worker: stragglers get speculative copies, whose letters must not count
        # (a map stage has one task per input partition: speculate once half are done)
        DSTREAM_FAULT_SLOW="20",
        DSTREAM_SPECULATION_QUANTILE="0.5",
        DSTREAM_FAULT_DIR=str(tmp_path),
    )
    with run_fleet(APP, workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(
            lambda: len(read_topic(kafka_bootstrap, dlq, idle_s=0.5)) >= n,
            90,
            f"{n} dead letters",
        )
        time.sleep(1.5)
        dead = read_topic(kafka_bootstrap, dlq)
        metric = _dead_lettered_metric(port)
        speculated = _metric(port, "dstream_speculative_tasks_launched_total")
        _stop(fleet)
        log = fleet.log
    # the slow worker's tasks got speculative copies: their letters were not counted twice
    assert speculated > 0, f"no speculative copy ran: the test shows nothing about them\n{log}"
    coords = [
        (h["dstream-source-partition"], h["dstream-source-offset"]) for h in map(_headers, dead)
    ]
    assert len(coords) == len(set(coords)) == n, len(coords)
    assert set(coords) == {(str(i % PARTS), str(i // PARTS)) for i in range(n)}
    assert metric == n
    assert read_topic(kafka_bootstrap, out, idle_s=0.5) == []
