"""The transactional clients an output partition's new owner makes (``ops.sinks``).

What taking over costs is measured by ``bench/txn_takeover.py``; these check the steps.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaException, Producer, TopicPartition

from bench.txn_takeover import commit as takeover_commit
from ops.config import Settings
from ops.sinks import FleetSinks, connect_by_id, transactional_clients
from tests.fleetkit import read_topic, wait_for


def test_connect_by_id_ends_on_a_named_broker(kafka_bootstrap: str) -> None:
    for _ in range(5):
        p = Producer({"bootstrap.servers": kafka_bootstrap})
        assert connect_by_id(p, None, 5.0)
        # the connection to the broker by its id is up: metadata comes from it
        assert p.list_topics(timeout=1).orig_broker_id >= 0


def test_connect_by_id_gives_up_in_time_without_a_broker() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it once closed
    p = Producer({"bootstrap.servers": f"127.0.0.1:{port}"})
    t0 = time.monotonic()
    assert not connect_by_id(p, None, 0.5)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("open_txn", [False, True], ids=["idle", "mid-transaction"])
def test_a_new_owner_fences_the_old_one_and_commits(
    open_txn: bool, kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    """The old owner is alive: idle, or stopped with its next batch's transaction open.

    In the second case the broker refuses the new owner's first producer while it aborts
    the open transaction, and a fresh producer takes over: the refused one must not ask
    again later (its retry timer fires 500 ms after the refusal), or it would fence the
    new owner, whose next commit then fails.
    """
    topic = new_topic(1)
    settings = Settings(kafka_bootstrap=kafka_bootstrap)
    tid = f"{topic}-{uuid.uuid4().hex[:6]}"
    tp = TopicPartition(topic, 0)

    def commit(producer: Any, marker: Any, batch: int, end: bool = True) -> None:
        takeover_commit(producer, marker, topic, batch, end, value=str(batch).encode())

    old = transactional_clients(settings, tid, f"{tid}-commits", "test", topic=topic)
    commit(*old, 0)
    if open_txn:
        commit(*old, 1, end=False)  # stopped mid-commit: records and marker sent
    new = transactional_clients(settings, tid, f"{tid}-commits", "test", topic=topic)
    assert FleetSinks.committed(new[1], tp)[0] == 1  # the old owner's committed marker
    commit(*new, 1)
    time.sleep(0.8)  # past any retry timer of a producer refused on the way
    commit(*new, 2)
    # the marker moves once the broker wrote the commit's markers (just after it answered)
    wait_for(lambda: FleetSinks.committed(new[1], tp)[0] == 3, 10, "the marker of batch 2")
    with pytest.raises(KafkaException) as e:  # the old owner is fenced
        if open_txn:
            old[0].commit_transaction(10)  # its open transaction is gone
        else:
            commit(*old, 3)
    assert e.value.args[0].fatal() or "fenc" in str(e.value).lower(), e.value
    for _, marker in (old, new):
        marker.close()
    # a read_committed reader sees each batch once: the open transaction was aborted
    got = [m.value() for m in read_topic(kafka_bootstrap, topic, idle_s=0.5)]
    assert got == [b"0", b"1", b"2"]


def test_a_slow_first_ask_resumes_on_the_same_producer(
    kafka_bootstrap: str, new_topic: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first ``init_transactions`` times out (not refused): the same call resumes.

    With a probe too short for any answer, every start takes this path; the producer must
    still come up, fence the old owner and commit.
    """
    import ops.sinks

    monkeypatch.setattr(ops.sinks, "INIT_PROBE_S", 0.0005)
    topic = new_topic(1)
    settings = Settings(kafka_bootstrap=kafka_bootstrap)
    tid = f"{topic}-{uuid.uuid4().hex[:6]}"
    old = transactional_clients(settings, tid, f"{tid}-commits", "test", topic=topic)
    new = transactional_clients(settings, tid, f"{tid}-commits", "test", topic=topic)
    takeover_commit(*new, topic, 0, value=b"0")
    with pytest.raises(KafkaException):  # the old owner was fenced
        old[0].begin_transaction()
        old[0].produce(topic, b"x")
        old[0].commit_transaction(10)
    for _, m in (old, new):
        m.close()
    assert [m.value() for m in read_topic(kafka_bootstrap, topic, idle_s=0.5)] == [b"0"]
