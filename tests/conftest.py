"""Session fixtures: real Kafka and Redis (started lazily, once), per-test topics and app ids.

* Services start only when a test asks for them (``kafka_bootstrap``, ``redis_url`` and
  the fixtures built on them), on free loopback ports in a tmp dir: never the
  ``dstream dev up`` instance. ``DSTREAM_KAFKA_BOOTSTRAP`` / ``DSTREAM_REDIS_URL`` point
  the whole session at existing services instead.
* Tests are marked by directory: ``tests/unit/**`` -> ``unit``, ``tests/integration/**`` ->
  ``integration``, ``tests/fault/**`` -> ``fault``, ``tests/e2e/**`` -> ``e2e``.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from ops.tools.devservices import DevServices

_TESTS = Path(__file__).resolve().parent
_TIERS = ("unit", "integration", "fault", "e2e")
#: Creating a topic on the single-node dev broker takes well under a second; 30 s covers
#: a loaded CI machine.
TOPIC_TIMEOUT_S = 30.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            rel = Path(item.path).resolve().relative_to(_TESTS)
        except ValueError:
            continue
        if len(rel.parts) > 1 and rel.parts[0] in _TIERS:
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


def _slug(text: str, limit: int = 32) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "t"


@pytest.fixture(scope="session")
def dev_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServices]:
    """The session's private services; each starts on first use, all stop at session end."""
    services = DevServices(tmp_path_factory.mktemp("devservices"))
    try:
        yield services
    finally:
        services.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(dev_services: DevServices) -> str:
    """``host:port`` of a real Kafka 4.x broker (KRaft, single node) for this session."""
    return dev_services.kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(dev_services: DevServices) -> str:
    """``redis://host:port/0`` of a real Redis for this session."""
    return dev_services.redis_url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A ``redis.Redis`` (bytes responses) on the session's Redis; closed after the test."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def app_id(request: pytest.FixtureRequest) -> str:
    """A fresh app id per test (``[a-z0-9-]``): prefix for its Redis keys and txn ids."""
    return f"t-{_slug(request.node.name, 24)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def new_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Callable[..., str]:
    """Factory ``new_topic(partitions=1, config=None) -> str``: a fresh, unique topic.

    Returns once the topic's metadata shows every partition with a leader, so producers
    and ``assign()``-ing consumers can use it at once.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    base = _slug(request.node.name, 40)

    def make(partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = f"{base}-{uuid.uuid4().hex[:8]}"
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
            operation_timeout=TOPIC_TIMEOUT_S,
        )
        futures[name].result(timeout=TOPIC_TIMEOUT_S)
        deadline = time.monotonic() + TOPIC_TIMEOUT_S
        while True:
            topic = admin.list_topics(name, timeout=5).topics.get(name)
            if (
                topic is not None
                and topic.error is None
                and len(topic.partitions) == partitions
                and all(p.leader >= 0 for p in topic.partitions.values())
            ):
                return name
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} not ready within {TOPIC_TIMEOUT_S} s")
            time.sleep(0.1)

    return make
