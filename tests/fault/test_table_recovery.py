"""A worker holding table partitions is killed: the tables are rebuilt, the joins stay exact.

The run of ``tests/integration/test_tables.py`` (page views joined with a file table and a
compacted-topic table that is updated and deleted from during the run), with one of the two
workers SIGKILLed right after the table updates were written. There is no checkpoint during
the run, so the lost table partitions are recomputed from the first batch (the file's
content and the topic's logged offset ranges); every batch's output must still equal the
reference runner's.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.fleetkit import Fleet, role_pids
from tests.integration.test_tables import run_enrich


def _kill_a_worker(fleet: Fleet) -> None:
    pids = role_pids(fleet, "worker")
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)


def test_killed_worker_table_partitions_are_rebuilt(
    kafka_bootstrap: str,
    redis_url: str,
    app_id: str,
    new_topic,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status = run_enrich(
        kafka_bootstrap, redis_url, app_id, new_topic, tmp_path, monkeypatch, _kill_a_worker
    )
    assert status["stats"]["recomputed"] > 0, status["stats"]
