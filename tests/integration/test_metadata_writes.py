"""Per-batch metadata writes against a real Redis: exact, fenced, constant round trips.

Round trips are counted on the client's connection (each ``send_packed_command`` is one
request sent; a pipeline is one), so the count is exact and needs no timing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from state.metalog import MetaLog, RedisMetaLog
from tests.unit.state.complete_contract import CHECKS, ranges_of


class CountingConnection(redis.Connection):
    """A redis-py connection that counts requests sent and their bytes."""

    sent = 0
    sent_bytes = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        chunks = [command] if isinstance(command, bytes | str) else command
        CountingConnection.sent += 1
        CountingConnection.sent_bytes += sum(len(c) for c in chunks)
        super().send_packed_command(command, check_health)


def _counting_client(redis_url: str) -> redis.Redis:
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    return redis.Redis(connection_pool=pool)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_redis_backend(check: Callable[[MetaLog], None], redis_url: str, app_id: str) -> None:
    check(RedisMetaLog(redis.Redis.from_url(redis_url), app_id))


def test_round_trips_per_batch_do_not_grow_with_partitions(redis_url: str, app_id: str) -> None:
    """Logging a batch and completing it: 2 requests, for 4 or 4,000 input partitions."""
    client = _counting_client(redis_url)
    per_batch: dict[int, int] = {}
    try:
        for workers in (1, 100, 1000):
            log = RedisMetaLog(client, f"{app_id}-{workers}")
            e = log.bump_epoch()
            log.log_batch(e, 0, ranges_of(0, workers), 0)  # loads the scripts
            log.complete(e, 0, [], 0)
            before = CountingConnection.sent
            for b in range(1, 4):
                log.log_batch(e, b, ranges_of(b, workers), b)
                ckpts = [(9, p, b) for p in range(workers * 4)]  # a pointer per partition
                log.complete(e, b, ckpts, keep_from=b - 1)
            per_batch[workers * 4] = (CountingConnection.sent - before) // 3
            assert sorted(log.logged()) == [2, 3]
            assert log.logged()[3].ranges == ranges_of(3, workers)
            assert log.checkpoints() == {(9, p): 3 for p in range(workers * 4)}
            assert log.done() == 3
    finally:
        for k in client.scan_iter(match=f"dstream:{app_id}-*"):
            client.delete(k)
        client.close()
    assert per_batch == {4: 2, 400: 2, 4000: 2}
