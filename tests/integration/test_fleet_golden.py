"""Golden tests of every DStream operator on a real ``--workers 2`` fleet (issue 3).

One fleet runs ``apps/golden_app.py``: a graph with one pipeline per operator, each fed
by its own ``queue_stream``, its records tagged with the case name and written to Kafka
(one topic per slide), plus two Redis outputs. Every case is then compared batch by batch
(messages grouped by the ``dstream-batch-seq`` header) with the plain-Python reference
runner and with the in-process engine, both built from the same pipeline functions.
The fleet runs once per module (starting it is the slow part); each case is a test.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from engine import StreamingContext
from engine.reference import ReferenceRunner
from engine.testing import assert_batches_equal, run_pipeline, run_reference
from state.metalog import RedisMetaLog
from tests.apps import golden_app as app
from tests.fleetkit import run_fleet, wait_for

APP = "tests/apps/golden_app.py"
N = app.NUM_BATCHES
#: Starting the fleet (imports, Kafka producers per output) and running N batches of
#: ~40 pipelines takes ~15 s here; 120 s leaves room for a loaded CI machine.
FLEET_TIMEOUT_S = 90.0


def reference_by_batch(pipeline: app.Pipeline, inputs: Sequence[app.Batches]) -> dict[int, list]:
    """The reference output of *pipeline*, by batch index (only batches where it emits)."""
    ssc = StreamingContext(app.INTERVAL, num_partitions=1)
    pipeline(*[ssc.queue_stream(b) for b in inputs]).foreach_batch(lambda t, r: None)
    ref = ReferenceRunner(ssc)
    ref.run(N)
    (out,) = ref.outputs.values()
    return {b: recs for b, recs in out}


def decode(msg: Any) -> tuple[str, Any]:
    """``(case, record)`` back from the Kafka sink's JSON (key = case, value = record)."""
    return json.loads(msg.key()), json.loads(msg.value())


def batch_seq(msg: Any) -> int:
    return int(dict(msg.headers() or [])["dstream-batch-seq"])


@dataclass
class GoldenRun:
    """What the fleet wrote: per case, records by batch index; Redis keys; the log."""

    outputs: dict[str, dict[int, list[Any]]] = field(default_factory=dict)
    redis_set: dict[str, Any] = field(default_factory=dict)
    redis_hash: dict[str, Any] = field(default_factory=dict)
    log: str = ""
    exit_code: int | None = None


def _create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=1, replication_factor=1) for n in names],
        operation_timeout=30,
    )
    for f in futures.values():
        f.result(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        md = admin.list_topics(timeout=5).topics
        if all(
            n in md and md[n].partitions.get(0) and md[n].partitions[0].leader >= 0 for n in names
        ):
            return
        assert time.monotonic() < deadline, "topics not ready"
        time.sleep(0.1)


def _read_outputs(
    bootstrap: str, topics: list[str], expected_counts: dict[str, int], timeout: float
) -> dict[str, dict[int, list[Any]]]:
    """Read the output topics (read_committed) until each case has its expected count."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"golden-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    out: dict[str, dict[int, list[Any]]] = {name: defaultdict(list) for name in expected_counts}
    seen = dict.fromkeys(expected_counts, 0)
    try:
        c.assign([TopicPartition(t, 0, 0) for t in topics])
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < deadline:
            for m in c.consume(10000, 0.2):
                if m.error() is not None:
                    continue
                b = batch_seq(m)
                if b < N:
                    name, record = decode(m)
                    out[name][b].append(record)
                    seen[name] += 1
            done = all(seen[n] >= expected_counts[n] for n in expected_counts)
            if done and settle_until is None:
                settle_until = time.monotonic() + 1.0  # catch duplicates, if any
            if settle_until is not None and time.monotonic() > settle_until:
                break
    finally:
        c.close()
    return {name: dict(v) for name, v in out.items()}


@pytest.fixture(scope="module")
def golden_run(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GoldenRun]:
    tag = uuid.uuid4().hex[:8]
    prefix = f"golden-{tag}-"
    app_id = f"t-golden-{tag}"
    topics = sorted({app.topic_of(name, prefix) for name in app.CASES})
    _create_topics(kafka_bootstrap, topics)
    expected_counts = {
        name: sum(len(r) for r in reference_by_batch(p, inputs).values())
        for name, (p, inputs) in app.CASES.items()
    }
    env = {
        "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_BATCH_INTERVAL": str(app.INTERVAL),
        "DSTREAM_NUM_PARTITIONS": "2",
        "GOLDEN_PREFIX": prefix,
    }
    run = GoldenRun()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    meta = RedisMetaLog(redis.Redis.from_url(redis_url), app_id)
    try:
        tmp = tmp_path_factory.mktemp("golden")
        with run_fleet(APP, workers=2, env=env, tmp=tmp) as fleet:
            try:
                try:
                    wait_for(
                        lambda: (meta.done() or -1) >= N - 1 or fleet.proc.poll() is not None,
                        FLEET_TIMEOUT_S,
                        f"the fleet to complete batch {N - 1}",
                    )
                except AssertionError as e:
                    msg = f"{e}; last done batch {meta.done()}; log tail:\n{fleet.log[-8000:]}"
                    raise AssertionError(msg) from None
                assert fleet.proc.poll() is None, f"the fleet died:\n{fleet.log}"
                run.outputs = _read_outputs(
                    kafka_bootstrap, topics, expected_counts, FLEET_TIMEOUT_S
                )
                pfx = f"dstream:{app_id}:"
                for key in client.scan_iter(pfx + "count:*"):
                    run.redis_set[key.removeprefix(pfx)] = json.loads(client.get(key))
                run.redis_hash = {
                    k: json.loads(v) for k, v in client.hgetall(pfx + app.REDIS_HASH_NAME).items()
                }
                run.exit_code = fleet.interrupt()
            finally:
                run.log = fleet.log
                (tmp / "fleet.log").write_text(run.log)
        yield run
    finally:
        client.close()


def test_fleet_ran_and_stopped(golden_run: GoldenRun) -> None:
    assert golden_run.exit_code == 0, golden_run.log


def test_no_output_task_was_fenced(golden_run: GoldenRun) -> None:
    fenced = [line for line in golden_run.log.splitlines() if "WARNING task out/" in line]
    assert not [line for line in fenced if "fenced" in line], "\n".join(fenced)


@pytest.mark.parametrize("case", list(app.CASES))
def test_operator_on_fleet_equals_reference(golden_run: GoldenRun, case: str) -> None:
    pipeline, inputs = app.CASES[case]
    expected = reference_by_batch(pipeline, inputs)
    # the test kit's reference gives the same batches (those where the stream emits)
    assert_batches_equal(
        run_reference(inputs[0], pipeline, *inputs[1:], num_batches=N, batch_interval=app.INTERVAL),
        list(expected.values()),
    )
    # the in-process engine agrees, with several partition counts
    for parts in (2, 3):
        got = run_pipeline(
            inputs[0],
            pipeline,
            *inputs[1:],
            num_batches=N,
            batch_interval=app.INTERVAL,
            num_partitions=parts,
        )
        assert_batches_equal(got, list(expected.values()))
    # the fleet: per batch, exactly the reference's records (none where it emits nothing)
    fleet = golden_run.outputs[case]
    for b in range(N):
        try:
            assert_batches_equal([fleet.get(b, [])], [expected.get(b, [])])
        except AssertionError as e:
            raise AssertionError(f"{case}, batch {b}: {e}\nall fleet batches: {fleet}") from None


def _final_state(pipeline: app.Pipeline, inputs: Sequence[app.Batches]) -> dict[Any, Any]:
    """Last value per key over the changelog; deleted keys (None) are absent."""
    state: dict[Any, Any] = {}
    for b, recs in sorted(reference_by_batch(pipeline, inputs).items()):
        del b
        for k, v in recs:
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
    return state


def test_to_redis_set_holds_the_final_values(golden_run: GoldenRun) -> None:
    expected = {
        app.REDIS_KEY_PATTERN.format(key=k): v for k, v in _final_state(*app.REDIS_SET).items()
    }
    assert expected == {"count:a": 7, "count:b": 7, "count:c": 1}
    assert golden_run.redis_set == expected


def test_to_redis_hash_holds_the_final_values_and_deletes(golden_run: GoldenRun) -> None:
    expected = _final_state(*app.REDIS_HASH)
    # b was written then deleted (HDEL); c deleted, then written again
    assert expected == {"a": 4, "c": 4}
    assert golden_run.redis_hash == expected
