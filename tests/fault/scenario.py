"""One fault scenario: a fleet under steady input, a fault, then exactly-once checks."""

from __future__ import annotations

import collections
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from tests.fleetkit import Fleet, fleet_env, read_topic, run_fleet, wait_for

APP = "tests/apps/fault_app.py"


def status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as r:
        return json.loads(r.read())


def check_exactly_once(messages: list[Any], expected: collections.Counter) -> None:
    """Per url: one value per batch, strictly increasing, ending at the exact count."""
    per_url: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for m in messages:
        seq = int(dict(m.headers())["dstream-batch-seq"])
        per_url[json.loads(m.key())].append((seq, json.loads(m.value())))
    assert set(per_url) == set(expected)
    for url, rows in per_url.items():
        rows.sort()
        seqs = [s for s, _ in rows]
        assert len(seqs) == len(set(seqs)), f"{url}: a batch was written twice: {rows}"
        values = [v for _, v in rows]
        assert values == sorted(set(values)), f"{url}: counts not strictly increasing: {rows}"
        assert values[-1] == expected[url], f"{url}: {values[-1]} != {expected[url]}"


def run_scenario(
    *,
    kafka: str,
    redis_url: str,
    app_id: str,
    new_topic: Callable[..., str],
    tmp: Path,
    fault: Callable[[Fleet, int], None],
    workers: int = 3,
    env: dict[str, str] | None = None,
    rate: int = 1500,
    seconds: float = 6.0,
    catch_up_s: float = 150.0,
) -> dict[str, Any]:
    """Run the fault app, apply *fault* mid-stream, check the committed output."""
    inp, out = new_topic(6), new_topic(2)
    port = free_port()
    full_env = fleet_env(
        kafka,
        redis_url,
        app_id,
        (inp, out),
        **{
            "DSTREAM_BATCH_INTERVAL": "0.3",
            "DSTREAM_CHECKPOINT_EVERY": "3",
            "DSTREAM_HTTP_PORT": str(port),
            "DSTREAM_FAULT_DIR": str(tmp),
            **(env or {}),  # a scenario's own settings win
        },
    )
    produce_pageviews(kafka, inp, rate=0, count=2000, keys=40, seed=21)
    feeding = threading.Thread(
        target=produce_pageviews,
        args=(kafka, inp),
        kwargs={"rate": rate, "duration": seconds, "keys": 40, "seed": 22},
    )
    with run_fleet(APP, workers=workers, env=full_env, tmp=tmp) as fleet:
        wait_for(lambda: len(read_topic(kafka, out, idle_s=0.3)) > 0, 90, "first output")
        feeding.start()
        time.sleep(seconds / 3)
        fault(fleet, port)
        feeding.join()
        views = read_topic(kafka, inp)
        expected = collections.Counter(json.loads(m.value())["url"] for m in views)

        last: dict[str, int] = {}

        def caught_up() -> bool:
            last.clear()
            for m in read_topic(kafka, out, idle_s=0.3):
                k = json.loads(m.key())
                last[k] = max(last.get(k, 0), json.loads(m.value()))
            return last == dict(expected)

        try:
            wait_for(caught_up, catch_up_s, "the output to catch up with the input", every=1.0)
        except AssertionError as e:
            tail = "\n".join(line for line in fleet.log.splitlines() if not line.startswith("%"))[
                -6000:
            ]
            try:
                st = status(port)
                state = {k: st[k] for k in ("oldest_pending", "stats", "next_batch", "workers")}
            except OSError as err:
                state = {"status": str(err)}
            diff = {
                url: (last.get(url), expected.get(url))
                for url in sorted(set(last) | set(expected))
                if last.get(url) != expected.get(url)
            }
            raise AssertionError(
                f"{e}\noutput vs input counts (differing urls): {diff}\n"
                f"status: {state}\nfleet log (tail):\n{tail}"
            ) from None
        final = status(port)
        fleet.interrupt()
        log = fleet.log
    check_exactly_once(read_topic(kafka, out), expected)
    r = redis.Redis.from_url(redis_url)
    stored = {k.decode(): json.loads(v) for k, v in r.hgetall(f"dstream:{app_id}:counts").items()}
    assert stored == dict(expected), "the Redis output differs from the input counts"
    return {"status": final, "log": log, "expected": expected}
