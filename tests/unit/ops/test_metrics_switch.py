"""``DSTREAM_METRICS=false``: every metric is a no-op and none is exported."""

from __future__ import annotations

import subprocess
import sys

from ops.config import load_settings
from tests.fleetkit import ROOT

_SCRIPT = """
from prometheus_client import generate_latest
from ops import metrics
metrics.TASK_DURATION.labels(stage="map").observe(0.5)
before = generate_latest().decode()
metrics.disable()
metrics.TASK_DURATION.labels(stage="map").observe(0.5)
metrics.INPUT_RECORDS.labels(topic="t", partition="0").inc(3)
metrics.LIVE_WORKERS.set(2)
after = generate_latest().decode()
print("dstream_task_duration_seconds_count" in before, "dstream_" in after)
"""


def test_disabled_metrics_record_and_export_nothing() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr


def test_the_setting() -> None:
    assert load_settings().metrics is True
    assert load_settings(metrics=False).metrics is False
