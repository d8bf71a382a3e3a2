"""Kafka topics the fleet writes to: created before batch 0, or a clear error at start.

A transactional output commits the batch number as the offset of a marker group on the
output topic's partition 0 (:mod:`ops.sinks`), so an output topic that does not exist
makes every commit fail (``UNKNOWN_TOPIC_OR_PART``) and every later batch wait behind the
first one: with broker auto-creation off (as production brokers run) the app would wedge.
The coordinator therefore calls :func:`ensure_output_topics` at start, before it competes
for the lease, and a topic it may not create stops it with one line saying what to do.

The sink's producer leaves the partition to librdkafka's key partitioner, so an output
topic may have any number of partitions; one (the default of
``DSTREAM_OUTPUT_TOPIC_PARTITIONS``) keeps the whole output in one ordered log.
:func:`ensure_topic` is also what the tooling (``dstream produce``, the demo) uses.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from engine.errors import ConfigError
from engine.graph import Node
from ops.config import Settings

__all__ = [
    "ADMIN_TIMEOUT_S",
    "TopicError",
    "ensure_output_topics",
    "ensure_topic",
    "output_topics",
]

#: Bound on each admin call (metadata, create): the single-node dev broker answers in well
#: under a second; 15 s covers a loaded cluster and still fails a start within seconds.
ADMIN_TIMEOUT_S = 15.0
#: After creation, how often metadata is polled until every partition has a leader.
_READY_POLL_S = 0.1


class TopicError(ConfigError):
    """A topic could not be checked or created; the message says what to do.

    Attributes:
        topic: the topic's name.
        unreachable: True when Kafka did not answer at all (nothing was refused).

    """

    def __init__(self, message: str, topic: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.topic = topic
        self.unreachable = unreachable


def _advice(code: int, topic: str) -> str:
    """What the operator does about a refused creation, by Kafka error code."""
    from confluent_kafka import KafkaError

    if code in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED):
        return (
            f"grant the fleet's Kafka principal CREATE on topic {topic!r}, or create the "
            "topic yourself, and start again"
        )
    if code == KafkaError.INVALID_REPLICATION_FACTOR:
        return (
            "set DSTREAM_OUTPUT_TOPIC_REPLICATION to at most the number of brokers "
            "(-1: the broker default), or create the topic yourself, and start again"
        )
    if code == KafkaError.INVALID_PARTITIONS:
        return "set DSTREAM_OUTPUT_TOPIC_PARTITIONS to at least 1 and start again"
    if code == KafkaError.TOPIC_EXCEPTION:
        return "use a valid topic name (letters, digits, '.', '_', '-'; at most 249 characters)"
    return "create the topic yourself (or let the fleet's principal create it) and start again"


def ensure_topic(
    config: dict[str, Any],
    topic: str,
    partitions: int,
    *,
    replication: int = -1,
    timeout: float = ADMIN_TIMEOUT_S,
    what: str = "topic",
) -> int:
    """Create *topic* if it does not exist; return its partition count.

    Idempotent: an existing topic (also one another process created concurrently) is left
    as it is, whatever its partition count. A topic created here is usable when this
    returns (every partition has a leader), so a producer's first write finds it.

    Args:
        config: librdkafka settings of an admin client (``bootstrap.servers`` at least).
        topic: the topic.
        partitions: partitions of a topic created here.
        replication: replication factor of a topic created here; -1: the broker default.
        timeout: bound on each admin call, in seconds.
        what: how messages name the topic (``"output topic"``).

    Raises:
        TopicError: Kafka cannot be reached (``unreachable``), or refuses the creation
            (authorization, policy, an invalid name or replication factor).

    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    where = config.get("bootstrap.servers", "?")
    # a runtime config logs through dstream.kafka (deduplicated); the tooling's bare ones
    # are silenced, so an unreachable broker is reported once, by the TopicError below
    admin = AdminClient(config if "logger" in config else {"log_level": 0, **config})
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        msg = f"cannot reach Kafka at {where} to check {what} {topic!r}: {e}"
        raise TopicError(msg, topic, unreachable=True) from e
    existing = meta.topics.get(topic)
    if existing is not None and existing.error is None and existing.partitions:
        return len(existing.partitions)
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=replication)],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    try:
        futures[topic].result(timeout)
    except KafkaException as e:
        err = e.args[0] if e.args else None
        code = err.code() if isinstance(err, KafkaError) else None
        if code != KafkaError.TOPIC_ALREADY_EXISTS:
            rf = "broker default" if replication < 0 else str(replication)
            reason = err.str() if isinstance(err, KafkaError) else str(e)
            msg = (
                f"cannot create {what} {topic!r} (partitions {partitions}, replication "
                f"{rf}) on {where}: {reason}; {_advice(code or 0, topic)}"
            )
            raise TopicError(msg, topic) from e
    _wait_ready(admin, topic, timeout)
    return partitions


def _wait_ready(admin: Any, topic: str, timeout: float) -> None:
    """Poll metadata until every partition of *topic* has a leader (bounded by *timeout*)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            tm = admin.list_topics(topic, timeout=min(5.0, timeout)).topics.get(topic)
        except Exception:  # noqa: S112  # a metadata blip: poll again until the deadline
            continue
        if (
            tm is not None
            and tm.error is None
            and tm.partitions
            and all(p.leader >= 0 for p in tm.partitions.values())
        ):
            return
        time.sleep(_READY_POLL_S)


def output_topics(nodes: Iterable[Node], settings: Settings, app_id: str) -> list[str]:
    """The Kafka topics an app writes to: its ``to_kafka`` outputs and its dead letters.

    The dead-letter topic (``dead_letter_topic`` or ``{app}-dead-letters``) is included
    when it is set explicitly or when the app reads or writes Kafka at all; an app of
    queue sources and Redis outputs needs no Kafka at start.
    """
    nodes = list(nodes)
    outs = {n.args["topic"] for n in nodes if n.kind == "output" and n.args["sink"] == "kafka"}
    uses_kafka = bool(outs) or any(
        n.kind == "source" and n.args.get("source") == "kafka" for n in nodes
    )
    if settings.dead_letter_topic or uses_kafka:
        outs.add(settings.dead_letter_topic or f"{app_id}-dead-letters")
    return sorted(outs)


def ensure_output_topics(settings: Settings, nodes: Iterable[Node], app_id: str) -> None:
    """Make sure every topic of :func:`output_topics` exists (the coordinator, at start).

    Missing topics are created with ``output_topic_partitions`` partitions and replication
    factor ``output_topic_replication``; existing ones are left alone.

    Raises:
        TopicError: a topic cannot be created, or Kafka cannot be reached; the message
            names the topic and what to do (the coordinator exits with it).

    """
    config = settings.kafka_client_config()
    for topic in output_topics(nodes, settings, app_id):
        ensure_topic(
            config,
            topic,
            settings.output_topic_partitions,
            replication=settings.output_topic_replication,
            what="output topic",
        )
