"""What moving an output partition costs: taking over a transactional id up to a commit.

When an output partition moves (its worker lost, paused or slow), the new owner makes a
transactional producer of the same ``transactional.id`` (its ``init_transactions`` fences
the old one) and its commit-marker consumer, reads the marker and commits the batch. Each
try here does that against the local broker while the old owner (the same id, one batch
committed) is still alive, as a paused worker's is: either idle, or stopped in the middle
of its next commit (records and marker sent, transaction open), which the new owner's
``init_transactions`` must have the broker abort first. The ways:

* ``plain``: ``Producer`` then ``init_transactions`` at once, the marker consumer after
  (what a client does by default);
* ``metadata once``: one metadata fetch before ``init_transactions`` (the fleet before it
  waited for a broker named by its id);
* ``fleet``: :func:`ops.sinks.transactional_clients` as the workers use it (metadata
  until a named broker answers, a fresh producer when the broker refuses the first one
  while it aborts the open transaction, the marker consumer made first).

Per way and old owner: the time from creating the clients to the committed transaction,
p50 and max over ``--tries``, and how many tries took over 0.3 s (librdkafka's 500 ms
producer-id retry timer). The ways take turns, each try with a fresh transactional id.

    .venv/bin/python -m bench.txn_takeover [--tries 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench import _common as c

Clients = Callable[[Any, str, str], tuple[Any, Any]]


def _consumer(settings: Any, group: str) -> Any:
    from confluent_kafka import Consumer

    return Consumer(
        settings.kafka_client_config(
            **{
                "group.id": group,
                "enable.auto.commit": False,
                "isolation.level": "read_uncommitted",
            }
        )
    )


def _producer(settings: Any, tid: str) -> Any:
    from confluent_kafka import Producer

    return Producer(
        settings.kafka_client_config(
            **{"transactional.id": tid, "linger.ms": 5, "enable.idempotence": True}
        )
    )


def plain(settings: Any, tid: str, topic: str) -> tuple[Any, Any]:
    p = _producer(settings, tid)
    p.init_transactions(30)
    return p, _consumer(settings, f"{tid}-commits")


def metadata_once(settings: Any, tid: str, topic: str) -> tuple[Any, Any]:
    p = _producer(settings, tid)
    p.list_topics(topic, timeout=2)
    p.init_transactions(30)
    return p, _consumer(settings, f"{tid}-commits")


def fleet(settings: Any, tid: str, topic: str) -> tuple[Any, Any]:
    from ops.sinks import transactional_clients

    return transactional_clients(settings, tid, f"{tid}-commits", "bench", topic=topic)


WAYS: dict[str, Clients] = {"plain": plain, "metadata once": metadata_once, "fleet": fleet}


def commit(
    producer: Any,
    marker: Any,
    topic: str,
    batch: int,
    end: bool = True,
    value: bytes = b"x" * 100,
) -> None:
    """One batch as the Kafka sink commits it: marker read, a record, offsets, commit.

    With *end* False the transaction is left open (the record and marker sent).
    """
    from confluent_kafka import TopicPartition

    from ops.sinks import FleetSinks

    FleetSinks.committed(marker, TopicPartition(topic, 0))
    producer.begin_transaction()
    producer.produce(topic, value)
    producer.send_offsets_to_transaction(
        [TopicPartition(topic, 0, batch + 1)], marker.consumer_group_metadata()
    )
    if end:
        producer.commit_transaction(30)
    else:
        producer.flush(30)


def takeover(settings: Any, way: Clients, topic: str, open_txn: bool) -> float:
    """Seconds from the new owner's clients to its first commit (the old owner alive)."""
    tid = f"{topic}-{uuid.uuid4().hex[:8]}"
    old_p, old_m = fleet(settings, tid, topic)
    commit(old_p, old_m, topic, 0)
    if open_txn:
        commit(old_p, old_m, topic, 1, end=False)
    time.sleep(0.2)
    t0 = time.monotonic()
    p, m = way(settings, tid, topic)
    commit(p, m, topic, 1)
    took = time.monotonic() - t0
    for client in (m, old_m):
        client.close()
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tries", type=int, default=20)
    args = ap.parse_args(argv)
    from ops.config import Settings

    c.print_machine()
    bootstrap, _ = c.services()
    settings = Settings(kafka_bootstrap=bootstrap)
    topic = f"bench-takeover-{uuid.uuid4().hex[:6]}"
    c.create_topic(bootstrap, topic, 1)
    takeover(settings, fleet, topic, False)  # the transaction and offsets topics exist
    owners = {"idle": False, "mid-transaction": True}
    took: dict[tuple[str, str], list[float]] = {(w, o): [] for o in owners for w in WAYS}
    for _ in range(args.tries):
        for owner, open_txn in owners.items():
            for name, way in WAYS.items():
                took[name, owner].append(takeover(settings, way, topic, open_txn))
    rows = []
    for (name, owner), xs in took.items():
        slow = sum(x > 0.3 for x in xs)
        p50, top = statistics.median(xs), max(xs)
        rows.append(f"| {owner} | {name} | {p50:.3f} | {top:.3f} | {slow} of {len(xs)} |")
        print(
            f"{owner:>15} {name:>13}: p50 {p50:.3f} s, max {top:.3f} s, over 0.3 s: "
            f"{slow}/{len(xs)}"
        )
    text = "\n".join(
        [
            "## Taking over an output partition (transactional id) up to its first commit",
            "",
            f"Machine: {c.machine_line()}. {args.tries} tries per way and old owner, taking "
            "turns; the old owner of the id alive, idle or stopped with its transaction "
            "open (`python -m bench.txn_takeover`).",
            "",
            "| old owner | way | p50 s | max s | over 0.3 s |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    c.write_fragment("txn_takeover.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
