"""The app's commit markers in Kafka: found at start, checked against Redis, reset.

The Kafka sink commits, in the transaction of each batch's output, the offset
``batch + 1`` of a marker consumer group ``{app}-{node}-{part}-commits`` whose ``metadata``
string is the app's incarnation id (:mod:`ops.sinks`); the dead-letter path may keep a
group ``{app}-dead-letters-commits``. These markers outlive Redis: a coordinator that
takes the lease compares them with the metadata it finds (:func:`check_markers`), and
``dstream reset`` deletes them (:func:`delete_marker_groups`).

Kafka is asked through the AdminClient with bounded timeouts (:data:`ADMIN_TIMEOUT_S`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.errors import DStreamError, MetadataLostError

#: Bound on each AdminClient request (list groups, list offsets, delete groups): a broker
#: answers in milliseconds; this covers a loaded one without hanging a start for long.
ADMIN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Marker:
    """One committed marker: *group* says batch *batch* of *topic* was written."""

    group: str
    topic: str
    partition: int
    batch: int  # the last batch written (the committed offset minus one)
    incarnation: str  # the marker's metadata ("" when it carries none)


def marker_group_re(app_id: str) -> re.Pattern[str]:
    """The names of the app's marker groups, and no other app's.

    ``{app}-{node}-{part}-commits`` and ``{app}-dead-letters-commits``: the two numbers
    make the match exact (app ``pv``'s pattern does not match app ``pv-2``'s groups,
    ``pv-2-{node}-{part}-commits``, which have three).
    """
    return re.compile(rf"^{re.escape(app_id)}-(\d+-\d+|dead-letters)-commits$")


def _admin(settings: Any) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(settings.kafka_client_config())


def marker_groups(admin: Any, app_id: str) -> list[str]:
    """The app's marker groups that exist in Kafka (sorted)."""
    listed = admin.list_consumer_groups(request_timeout=ADMIN_TIMEOUT_S).result(
        timeout=ADMIN_TIMEOUT_S + 5
    )
    pattern = marker_group_re(app_id)
    return sorted(g.group_id for g in listed.valid if pattern.match(g.group_id))


def find_markers(settings: Any, app_id: str) -> list[Marker]:
    """Every committed marker of the app (offsets below 0 mean none: skipped).

    Raises:
        DStreamError: Kafka did not answer within the bounded timeouts.

    """
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException

    admin = _admin(settings)
    out: list[Marker] = []
    try:
        for group in marker_groups(admin, app_id):
            futures = admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group)], request_timeout=ADMIN_TIMEOUT_S
            )
            got = futures[group].result(timeout=ADMIN_TIMEOUT_S + 5)
            for tp in got.topic_partitions or []:
                if tp.offset is not None and tp.offset >= 0:
                    out.append(
                        Marker(group, tp.topic, tp.partition, tp.offset - 1, tp.metadata or "")
                    )
    except (KafkaException, TimeoutError) as e:
        msg = f"reading the commit markers of app {app_id} from Kafka failed: {e}"
        raise DStreamError(msg) from e
    return out


def delete_marker_groups(settings: Any, app_id: str) -> list[str]:
    """Delete the app's marker groups; returns the names deleted.

    Raises:
        DStreamError: a group could not be deleted (it has members, Kafka did not answer).

    """
    from confluent_kafka import KafkaException

    admin = _admin(settings)
    try:
        groups = marker_groups(admin, app_id)
        if not groups:
            return []
        futures = admin.delete_consumer_groups(groups, request_timeout=ADMIN_TIMEOUT_S)
        for f in futures.values():
            f.result(timeout=ADMIN_TIMEOUT_S + 5)
    except (KafkaException, TimeoutError) as e:
        msg = f"deleting the commit markers of app {app_id} from Kafka failed: {e}"
        raise DStreamError(msg) from e
    return groups


def check_markers(
    app_id: str, incarnation: str | None, markers: list[Marker], last_logged: int | None = None
) -> None:
    """Refuse to start when Kafka holds markers the Redis metadata does not account for.

    Called by a coordinator that took the lease, before it loads anything. Pure.

    Args:
        app_id: the app.
        incarnation: the incarnation id in Redis; None when Redis has no metadata.
        markers: :func:`find_markers`.
        last_logged: the highest batch the metadata log knows (logged or done); None when
            it knows none. A batch is logged before it is scheduled, so no marker of this
            run can be past it.

    Raises:
        MetadataLostError: markers exist but Redis has no metadata (it was lost); markers
            carry another incarnation than Redis' (Redis holds another run's data); or
            markers are ahead of the log (Redis was restored from an older copy, or lost
            its latest writes: the batches in between would be skipped as written).

    """
    if not markers:
        return
    how = (
        "Restore Redis from a backup, or run `dstream reset --app-id "
        f"{app_id}` to start the app fresh"
    )
    if incarnation is None:
        last = max(markers, key=lambda m: m.batch)
        msg = (
            f"app {app_id} has output commit markers in Kafka (batch {last.batch} of "
            f"incarnation {last.incarnation or 'unknown'}) but no metadata in Redis: its Redis "
            f"data was lost. {how}"
        )
        raise MetadataLostError(msg)
    # markers without an incarnation (another writer's) say nothing about which run they are
    other = [m for m in markers if m.incarnation and m.incarnation != incarnation]
    if other:
        last = max(other, key=lambda m: m.batch)
        msg = (
            f"app {app_id} has output commit markers in Kafka of incarnation "
            f"{last.incarnation} (batch {last.batch}, group {last.group}) but its metadata in "
            f"Redis is of incarnation {incarnation}: Redis holds another run's data. {how}"
        )
        raise MetadataLostError(msg)
    ahead = [m for m in markers if last_logged is None or m.batch > last_logged]
    if ahead:
        last = max(ahead, key=lambda m: m.batch)
        msg = (
            f"app {app_id} has output commit markers in Kafka up to batch {last.batch} (group "
            f"{last.group}) but its metadata in Redis only up to batch "
            f"{'none' if last_logged is None else last_logged}: Redis was restored from an "
            f"older copy or lost its latest writes. {how}"
        )
        raise MetadataLostError(msg)
