"""Queries on live state on a real ``--workers 2`` fleet (issue 15, part 3).

The app (``tests/apps/query_app.py``) names a stream of every queryable kind over a
deterministic queue input. While it runs, ``dstream query`` and ``GET /api/state/...``
answers are compared, for every key, with the reference runner's state at the batch each
answer names; then one worker is killed (``kill -9``) and every answer during the recovery
must still be the whole state of the batch (or checkpoint) it names, never a partial one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from engine import StreamingContext
from engine.query import key_text
from engine.reference import ReferenceRunner
from ops.tools.devservices import free_port
from state.metalog import RedisMetaLog
from tests.apps import query_app
from tests.fleetkit import ROOT, Fleet, fleet_env, leader_batches, role_pids, run_fleet, wait_for

APP = "tests/apps/query_app.py"
INTERVAL = 0.2
_COORDINATOR = re.compile(r"fleet of app \S+: coordinator (\S+) and \d+ workers")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def expected(stream: str, first: int, batch: int) -> list[Any]:
    """The reference answer of a full scan of *stream* at absolute *batch*, sorted, as JSON."""
    ssc = StreamingContext(INTERVAL, num_partitions=query_app.PARTITIONS)
    query_app.pipeline(ssc.queue_stream([query_app.records(i) for i in range(batch - first + 1)]))
    ref = ReferenceRunner(ssc, first=first)
    ref.run(batch - first + 1)
    (node,) = [n for n in ssc.nodes if n.name == stream]
    if node.kind == "window":
        recs = ref.get(node, batch)
        out = sorted(json.loads(json.dumps(r)) for r in recs)
        return out
    state = ref.states.get(node.id, {})
    if node.kind == "state" and node.args["mode"] == "track":
        state = {k: v[0] for k, v in state.items()}
    return sorted(json.loads(json.dumps([k, v])) for k, v in state.items())


def check(answer: dict[str, Any], first: int, keys: list[str] | None = None) -> None:
    """*answer* equals the reference at the batch it names (for *keys*, or every key)."""
    want = expected(answer["stream"], first, answer["batch"])
    if keys:
        want = [e for e in want if key_text(e[0]) in keys]
    assert not answer["more"], answer
    got = sorted(answer["items"])
    assert got == want, (answer["stream"], answer["batch"], answer["source"], got, want)


def http_query(port: int, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body else {}


def cli_query(
    address: str, secret: str, app_id: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DSTREAM_SECRET": secret}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ops.cli",
            "query",
            "--app-id",
            app_id,
            "--coordinator",
            address,
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _completed(port: int, token: str) -> int:
    try:
        code, st = http_query(port, "/api/status", token)
    except OSError:
        return 0
    return leader_batches(st) if code == 200 else 0


def _start(fleet: Fleet, port: int, token: str, batches: int) -> str:
    wait_for(lambda: _COORDINATOR.search(fleet.log) is not None, 30, "the coordinator address")
    m = _COORDINATOR.search(fleet.log)
    assert m is not None
    wait_for(lambda: _completed(port, token) >= batches, 40, f"{batches} completed batches")
    return m.group(1)


def _env(kafka: str, redis_url: str, app_id: str, port: int, secret: str, **extra: str) -> dict:
    return fleet_env(
        kafka,
        redis_url,
        app_id,
        DSTREAM_BATCH_INTERVAL=str(INTERVAL),
        DSTREAM_SECRET=secret,
        DSTREAM_HTTP_PORT=str(port),
        DSTREAM_HTTP_AUTH="true",
        **extra,
    )


def test_queries_equal_the_reference_state_at_their_batch(
    kafka_bootstrap: str, redis_url: str, redis_client: Any, app_id: str, tmp_path: Path
) -> None:
    port, secret = free_port(), secrets.token_hex(16)
    env = _env(kafka_bootstrap, redis_url, app_id, port, secret)
    answers: list[tuple[dict[str, Any], list[str] | None]] = []
    with run_fleet(APP, workers=2, tmp=tmp_path, env=env) as fleet:
        address = _start(fleet, port, secret, 6)
        for stream in ("counts", "totals", "sessions", "recent", "last"):
            code, a = http_query(port, f"/api/state/{stream}?limit=1000", secret)
            assert code == 200, a
            answers.append((a, None))
        keys = ["k00", "k07", "nope"]
        code, a = http_query(port, "/api/state/counts?key=k00&key=k07&key=nope", secret)
        assert code == 200, a
        answers.append((a, keys))
        code, scan = http_query(port, "/api/state/totals?prefix=k1&limit=3", secret)
        assert code == 200, scan
        cli = cli_query(address, secret, app_id, "sessions", "--json", "--limit", "1000")
        assert cli.returncode == 0, cli.stderr
        answers.append((json.loads(cli.stdout), None))
        text = cli_query(address, secret, app_id, "counts", "k00", "k07")
        # errors: one line each, naming what to do
        unknown = cli_query(address, secret, app_id, "nosuch")
        stateless = cli_query(address, secret, app_id, "pairs")
        other_app = cli_query(address, secret, "another-app", "counts")
        no_token = http_query(port, "/api/state/counts")
        http_unknown = http_query(port, "/api/state/nosuch", secret)
        http_stateless = http_query(port, "/api/state/pairs", secret)
        bad_limit = http_query(port, "/api/state/counts?limit=x", secret)
        assert fleet.interrupt() == 0, fleet.log
    first = RedisMetaLog(redis_client, app_id).first_batch(-1)
    assert first >= 0
    for a, ks in answers:
        assert a["source"] == "workers", a
        assert a["batch_time_ms"] > 0
        assert a["items"], a  # a non-trivial state to compare
        check(a, first, ks)
    looked_up = answers[5][0]
    present = {e[0] for e in expected("counts", first, looked_up["batch"])}
    assert looked_up["missing"] == [k for k in keys if k not in present] and "nope" not in present
    # a scan: the first keys (in key order) with the prefix, and "more" when cut
    full = [e for e in expected("totals", first, scan["batch"]) if e[0].startswith("k1")]
    assert scan["items"] == full[:3] and scan["more"] == (len(full) > 3), (scan, full)

    assert text.returncode == 0, text.stderr
    head, *rows = text.stdout.splitlines()
    assert head.startswith("counts (state) as of batch "), text.stdout
    assert "from the workers" in head
    assert [r.split("\t")[0] for r in rows] == ["k00", "k07"], text.stdout
    for res, words in (
        (unknown, "unknown stream 'nosuch'; the app's named streams: counts, last, pairs"),
        (stateless, "'pairs' is a map stream and holds no state"),
        (other_app, "runs app"),
    ):
        assert res.returncode == 1, res
        assert words in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert no_token[0] == 401
    assert http_unknown[0] == 404 and "counts" in http_unknown[1]["error"]
    assert http_stateless[0] == 400
    assert bad_limit[0] == 400


def test_a_query_during_recovery_is_never_partial(
    kafka_bootstrap: str, redis_url: str, redis_client: Any, app_id: str, tmp_path: Path
) -> None:
    port, secret = free_port(), secrets.token_hex(16)
    env = _env(kafka_bootstrap, redis_url, app_id, port, secret, DSTREAM_CHECKPOINT_EVERY="3")
    answers: list[dict[str, Any]] = []
    refused = 0
    with run_fleet(APP, workers=2, tmp=tmp_path, env=env) as fleet:
        _start(fleet, port, secret, 8)
        victim = role_pids(fleet, "worker")[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # query until the fleet answers from the workers again, well after the loss
        while time.monotonic() - killed_at < 12:
            code, a = http_query(port, "/api/state/counts?limit=1000", secret)
            if code == 200:
                answers.append(a)
                if a["source"] == "workers" and time.monotonic() - killed_at > 6:
                    break
            else:
                assert code == 503, a  # waited for the rebuild, then said so
                refused += 1
            time.sleep(0.02)  # pacing only: a query every few batches is plenty
        assert fleet.interrupt() == 0, fleet.log
    first = RedisMetaLog(redis_client, app_id).first_batch(-1)
    assert answers, f"no answer during recovery ({refused} refused)"
    for a in answers:
        check(a, first)
    assert answers[-1]["source"] == "workers"
    print(
        f"answers during recovery: {len(answers)} "
        f"({sum(a['source'] == 'checkpoint' for a in answers)} from the checkpoint), "
        f"{refused} refused"
    )
