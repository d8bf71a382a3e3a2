"""The runnable examples on a real ``--workers 2`` fleet, checked against plain Python.

* ``examples/windowed.py``: a window that holds every view equals the per-url counts of the
  input exactly, and once the views left the window every url reads 0.
* ``examples/sessions.py``: per user, the session (view count, first and last time) equals
  the input; an exit view deletes the session; the others time out with their final state.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from ops.tools.produce import produce_pageviews
from tests.fleetkit import last_values, read_topic, run_fleet, wait_for

INTERVAL = "0.5"


def _env(kafka_bootstrap: str, redis_url: str, app_id: str, **more: str) -> dict[str, str]:
    return {
        "DSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_BATCH_INTERVAL": INTERVAL,
        **more,
    }


def _windows(messages: list[Any]) -> dict[int, dict[str, int]]:
    """Window contents by batch index (header ``dstream-batch-seq``)."""
    out: dict[int, dict[str, int]] = collections.defaultdict(dict)
    for m in messages:
        b = int(dict(m.headers() or [])["dstream-batch-seq"])
        out[b][json.loads(m.key())] = json.loads(m.value())
    return dict(out)


def test_windowed_example(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path
) -> None:
    inp, out = new_topic(3), new_topic(1)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=3000, keys=30, seed=11)
    totals = collections.Counter(
        json.loads(m.value())["url"] for m in read_topic(kafka_bootstrap, inp)
    )
    zeros = dict.fromkeys(totals, 0)
    env = _env(kafka_bootstrap, redis_url, app_id, PAGEVIEWS_TOPIC=inp, PAGEVIEWS_WINDOW_OUTPUT=out)
    seen: dict[int, dict[str, int]] = {}

    def windows_reach(target: dict[str, int]) -> bool:
        seen.update(_windows(read_topic(kafka_bootstrap, out, idle_s=0.5)))
        return any(w == target for w in seen.values())

    with run_fleet("examples/windowed.py", workers=2, env=env, tmp=tmp_path) as fleet:
        # all views are read within the first seconds: some 10 s window holds every one
        wait_for(lambda: windows_reach(dict(totals)), 90, "a window with every view")
        # 10 s later they all left the window: every url stays, with count 0 (inverse)
        wait_for(lambda: windows_reach(zeros), 60, "a window with every count at 0")
        code = fleet.interrupt()
    assert code == 0, fleet.log

    slide_batches = round(2 / float(INTERVAL))
    for b, window in seen.items():
        assert (b + 1) % slide_batches == 0, f"batch {b} is not a slide end"
        # every window is a part of the input: no url or view that was not produced
        assert set(window) <= set(totals)
        assert all(0 <= n <= totals[url] for url, n in window.items()), window


def _exit_views(bootstrap: str, topic: str, users: list[str]) -> None:
    p = Producer({"bootstrap.servers": bootstrap})
    now = int(time.time() * 1000)
    for u in users:
        p.produce(topic, json.dumps({"url": "/exit", "user": u, "ts": now, "seq": 0}).encode())
    assert p.flush(30) == 0


def test_sessions_example(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic, tmp_path: Path
) -> None:
    inp, out = new_topic(3), new_topic(1)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=2000, keys=20, seed=5)
    sessions: dict[str, dict[str, int]] = {}
    for m in read_topic(kafka_bootstrap, inp):
        ev = json.loads(m.value())
        s = sessions.get(ev["user"])
        sessions[ev["user"]] = (
            {"views": 1, "first_ts": ev["ts"], "last_ts": ev["ts"]}
            if s is None
            else {
                "views": s["views"] + 1,
                "first_ts": min(s["first_ts"], ev["ts"]),
                "last_ts": max(s["last_ts"], ev["ts"]),
            }
        )
    exiting = sorted(sessions, key=lambda u: (-sessions[u]["views"], u))[:5]
    env = _env(
        kafka_bootstrap,
        redis_url,
        app_id,
        PAGEVIEWS_TOPIC=inp,
        SESSIONS_OUTPUT=out,
        SESSION_TIMEOUT="10s",
    )
    with run_fleet("examples/sessions.py", workers=2, env=env, tmp=tmp_path) as fleet:
        wait_for(
            lambda: last_values(read_topic(kafka_bootstrap, out, idle_s=0.5)) == sessions,
            90,
            "every session to equal the input",
        )
        _exit_views(kafka_bootstrap, inp, exiting)
        final = {
            u: None if u in exiting else {**s, "ended": "timeout"} for u, s in sessions.items()
        }
        wait_for(
            lambda: last_values(read_topic(kafka_bootstrap, out, idle_s=0.5)) == final,
            60,
            "exits to delete their sessions and the others to time out",
        )
        code = fleet.interrupt()
    assert code == 0, fleet.log
