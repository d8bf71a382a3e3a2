"""``make demo``: the page-view pipeline on a local fleet, fed by the producer harness.

Starts nothing itself but the fleet (``make demo`` ran ``dstream dev up`` first), produces
page views at 1,000 records/s, and prints the running counts as they change, for about
30 s or until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ops.services import settings_from
from ops.tools.devservices import use_dev_services
from ops.tools.produce import ensure_topic, produce_pageviews

ROOT = Path(__file__).resolve().parents[2]
DURATION_S = 30.0


def main() -> int:
    use_dev_services()
    settings = settings_from()
    inp, out = "pageviews", "pageview-counts"
    ensure_topic(settings.kafka_bootstrap, inp, 3, extra_config=settings.kafka_config)
    ensure_topic(settings.kafka_bootstrap, out, 1, extra_config=settings.kafka_config)
    app_id = f"pageviews-demo-{int(time.time())}"
    env = {
        **os.environ,
        "DSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "DSTREAM_REDIS_URL": settings.redis_url.get_secret_value(),
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_LOG_LEVEL": os.environ.get("DSTREAM_LOG_LEVEL", "WARNING"),
    }
    print(f"demo: app {app_id}, input topic {inp!r} (3 partitions), output topic {out!r}")
    fleet = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ops.cli",
            "run",
            "examples/pageviews.py",
            "--workers",
            "2",
            "--log-level",
            env["DSTREAM_LOG_LEVEL"],
        ],
        cwd=ROOT,
        env=env,
    )
    stop = threading.Event()
    producer = threading.Thread(
        target=lambda: produce_pageviews(
            settings.kafka_bootstrap,
            inp,
            rate=1000,
            duration=DURATION_S,
            keys=20,
            key_dist="zipf",
            seed=int(time.time()),
        ),
        daemon=True,
    )
    producer.start()
    try:
        _print_counts(settings.kafka_bootstrap, out, stop, time.monotonic() + DURATION_S + 3)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        if fleet.poll() is None:
            fleet.send_signal(signal.SIGINT)
            try:
                fleet.wait(30)
            except subprocess.TimeoutExpired:
                fleet.kill()
    print("demo: stopped")
    return 0


def _print_counts(bootstrap: str, topic: str, stop: threading.Event, until: float) -> None:
    from confluent_kafka import OFFSET_END, Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-{time.time_ns()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    c.assign([TopicPartition(topic, 0, OFFSET_END)])
    counts: dict[str, int] = {}
    started = time.monotonic()
    try:
        while not stop.is_set() and time.monotonic() < until:
            msgs = [m for m in c.consume(10000, 0.5) if m.error() is None]
            if not msgs:
                continue
            changed = {}
            for m in msgs:
                changed[json.loads(m.key() or b"null")] = json.loads(m.value() or b"null")
            counts.update(changed)
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
            line = "  ".join(f"{u}={n}" for u, n in top)
            print(
                f"[{time.monotonic() - started:5.1f}s] {len(changed):3d} urls changed, "
                f"{sum(counts.values()):7d} views  |  {line}",
                flush=True,
            )
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
