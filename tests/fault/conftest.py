"""Fixtures of the fault tests."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

from tests.fault.scenario import run_scenario


@pytest.fixture
def scenario(kafka_bootstrap, redis_url, app_id, new_topic, tmp_path) -> Callable[..., Any]:
    """``run_scenario`` bound to this test's Kafka, Redis, app id, topics and tmp dir."""
    return functools.partial(
        run_scenario,
        kafka=kafka_bootstrap,
        redis_url=redis_url,
        app_id=app_id,
        new_topic=new_topic,
        tmp=tmp_path,
    )
