"""``dstream status --coordinator HOST:PORT`` prints batches, workers and receivers of a run."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from ops.tools.produce import produce_pageviews
from tests.fleetkit import ROOT, Fleet, fleet_env, leader_batches, run_fleet, wait_for

_COORDINATOR = re.compile(r"fleet of app \S+: coordinator (\S+) and \d+ workers")


def _status(address: str, secret: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DSTREAM_SECRET"}
    if secret:
        env["DSTREAM_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "status", "--coordinator", address, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _address(fleet: Fleet) -> str | None:
    m = _COORDINATOR.search(fleet.log)
    return m.group(1) if m else None


def test_status_prints_tables_during_a_run(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    inp, out = new_topic(3), new_topic(1)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=1500, keys=20, seed=9)
    secret = secrets.token_hex(16)
    env = fleet_env(
        kafka_bootstrap,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL="0.5",
        DSTREAM_SECRET=secret,
    )
    with run_fleet("examples/pageviews.py", workers=2, tmp=tmp_path, env=env) as fleet:
        wait_for(lambda: _address(fleet) is not None, 30, "the fleet to log its coordinator")
        address = _address(fleet)
        assert address is not None

        def batches_done() -> bool:
            res = _status(address, secret, "--json")
            return res.returncode == 0 and leader_batches(json.loads(res.stdout)) >= 4

        wait_for(batches_done, 60, "four completed batches")
        res = _status(address, secret)
        no_secret = _status(address, "")
        wrong_secret = _status(address, secrets.token_hex(16))
        assert fleet.interrupt() == 0, fleet.log

    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert text.startswith(f"app {app_id}  epoch "), text
    lines = text.splitlines()
    # three tables, each with its header and a dashed rule under it
    heads = [i for i, line in enumerate(lines) if line.startswith(("batch ", "worker ", "topic "))]
    assert [lines[i].split()[0] for i in heads] == ["batch", "worker", "topic"], text
    assert all(set(lines[i + 1].replace(" ", "")) == {"-"} for i in heads), text
    batch_rows = lines[heads[0] + 2 : heads[1] - 1]
    assert len(batch_rows) >= 4, text
    assert all(
        re.match(r"^\d+\s+\d+\s+\S+ ms\s+\S+ ms\s+\S+ ms$", r) for r in map(str.strip, batch_rows)
    ), text
    worker_rows = lines[heads[1] + 2 : heads[2] - 1]
    assert len(worker_rows) == 2, text
    receiver_rows = lines[heads[2] + 2 :]
    assert sorted(r.split()[:2] for r in receiver_rows) == [[inp, str(p)] for p in range(3)]

    # without the shared secret there is no status, and the error says what to do
    assert no_secret.returncode == 2  # a usage error: a setting is missing
    assert "DSTREAM_SECRET" in no_secret.stderr
    assert wrong_secret.returncode != 0
    assert "Traceback" not in wrong_secret.stderr, wrong_secret.stderr
