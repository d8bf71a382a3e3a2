"""Kafka or Redis unreachable at start: a line per dependency, retries, then one error line.

The real ``dstream coordinator`` and ``dstream worker`` processes, one dependency real (the
session's Kafka or Redis) and the other a free loopback port nothing listens on. Before
this, a coordinator printed about 600 librdkafka ``FAIL`` lines in 30 s and then a
``cimpl.KafkaException`` traceback (issue #14).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from ops.tools.devservices import free_port
from tests.fleetkit import ROOT, fleet_env

APP = "tests/apps/fault_app.py"  # reads Kafka, keeps state, writes Kafka and Redis


def _role(role: str, kafka: str, redis_url: str, app_id: str, bound: str) -> tuple[int, str, float]:
    """Run *role* until it gives up; its exit code, its whole output and how long it ran."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DSTREAM_")},
        **fleet_env(kafka, redis_url, app_id, ("pv-in", "pv-out")),
        "DSTREAM_SECRET": uuid.uuid4().hex,
        "DSTREAM_STARTUP_TIMEOUT": bound,
    }
    cmd = [sys.executable, "-m", "ops.cli", role, "--app", APP, "--http-port", "0"]
    if role == "worker":
        cmd += ["--rpc-port", "0", "--coordinator", f"127.0.0.1:{free_port()}"]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def _check(code: int, out: str, took: float, bound_s: float, silent: str, address: str) -> None:
    lines = out.splitlines()
    assert code == 1, out
    assert "Traceback" not in out, out
    assert len(lines) <= 10, f"{len(lines)} lines:\n{out}"
    assert bound_s <= took < bound_s + 10, (took, out)
    said = [ln for ln in lines if f"{silent} at {address} did not answer" in ln]
    assert len(said) == 2, out  # once while retrying, once giving up
    assert said[0].endswith(
        f"retrying with backoff for up to {bound_s:g} s (DSTREAM_STARTUP_TIMEOUT)"
    ), said[0]
    assert lines[-1] == said[1], out  # the last line says why the process stops
    assert lines[-1].startswith(f"dstream: {silent} at {address} did not answer ("), lines[-1]
    assert f"gave up after {bound_s:g} s (DSTREAM_STARTUP_TIMEOUT)" in lines[-1], lines[-1]
    other = "redis" if silent == "kafka" else "kafka"
    assert f"{other} at" not in out, out  # the dependency that answered is not mentioned
    assert sum("FAIL" in ln for ln in lines) <= 1, out  # librdkafka's, deduplicated


def test_coordinator_with_kafka_unreachable(redis_url: str, app_id: str) -> None:
    kafka = f"127.0.0.1:{free_port()}"
    code, out, took = _role("coordinator", kafka, redis_url, app_id, "10s")
    _check(code, out, took, 10, "kafka", kafka)
    assert "metadata request" in out


def test_coordinator_with_redis_unreachable(kafka_bootstrap: str, app_id: str) -> None:
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    code, out, took = _role("coordinator", kafka_bootstrap, redis_url, app_id, "4s")
    _check(code, out, took, 4, "redis", redis_url)
    assert "(PING, " in out


def test_worker_with_redis_unreachable(kafka_bootstrap: str, app_id: str) -> None:
    redis_url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    code, out, took = _role("worker", kafka_bootstrap, redis_url, app_id, "4s")
    _check(code, out, took, 4, "redis", redis_url.replace("hunter2", "***"))
    assert "hunter2" not in out
