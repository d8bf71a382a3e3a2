"""The leader lease of the Redis metadata log, against a real Redis."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from state.metalog import MetaLog, RedisMetaLog
from tests.unit.state.lease_contract import CHECKS


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_redis_lease(check: Callable[[MetaLog], None], redis_url: str, app_id: str) -> None:
    check(RedisMetaLog(redis.Redis.from_url(redis_url), app_id))
