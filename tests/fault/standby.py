"""A fleet with two coordinators (one leads, one stands by), every role its own process.

Outside Kubernetes there is no Service in front of the coordinators: every process takes
the list of both addresses. The two coordinators listen on one port at 127.0.0.1 and
127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback), as the design asks.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from tests.fault.scenario import check_exactly_once
from tests.fleetkit import ROOT, fleet_env, read_topic, wait_for

APP = "tests/apps/fault_app.py"
HOSTS = ("127.0.0.1", "127.0.0.2")
SECRET = "standby-test-secret"


class Proc:
    """One role's process, its log in a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], tmp: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = tmp / f"{name}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self) -> Proc:
        self.log_path = self.log_path.with_name(f"{self.name}-{time.monotonic_ns()}.log")
        self.logs.append(self.log_path)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    @property
    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Coordinator(Proc):
    def __init__(self, host: str, http_port: int, env: dict[str, str], tmp: Path) -> None:
        cmd = [sys.executable, "-m", "ops.cli", "coordinator", "--app", APP]
        cmd += ["--bind-host", host, "--http-port", str(http_port), "--expect-workers", "3"]
        super().__init__(f"coordinator-{host}", cmd, env, tmp)
        self.host = host
        self.http_port = http_port

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://{self.host}:{self.http_port}{path}", timeout=1
            ) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""
        except OSError:
            return 0, b""

    def ready(self) -> bool:
        """Its /readyz: 200 only while it leads."""
        return self.get("/readyz")[0] == 200

    def status(self) -> dict[str, Any]:
        code, body = self.get("/api/status")
        return json.loads(body) if code == 200 else {}


class StandbyFleet:
    """Two coordinators and three workers on one Kafka and Redis."""

    def __init__(self, kafka: str, redis_url: str, app_id: str, topics: tuple[str, str], tmp: Path):
        port = free_port()
        self.kafka = kafka
        self.redis_url = redis_url
        self.app_id = app_id
        self.input, self.output = topics
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DSTREAM_")},
            **fleet_env(
                kafka,
                redis_url,
                app_id,
                topics,
                DSTREAM_SECRET=SECRET,
                DSTREAM_COORDINATOR=",".join(f"{h}:{port}" for h in HOSTS),
                DSTREAM_BATCH_INTERVAL="0.5",
                DSTREAM_CHECKPOINT_EVERY="4",
            ),
        }
        self.coordinators = [Coordinator(h, free_port(), self.env, tmp) for h in HOSTS]
        worker = [sys.executable, "-m", "ops.cli", "worker", "--app", APP]
        worker += ["--rpc-port", "0", "--http-port", "0"]
        self.workers = [Proc(f"worker-{i}", worker, self.env, tmp) for i in range(3)]

    def leader(self) -> Coordinator | None:
        ready = [c for c in self.coordinators if c.alive() and c.ready()]
        return ready[0] if len(ready) == 1 else None

    def wait_leader(self, timeout: float, other_than: Coordinator | None = None) -> Coordinator:
        found: list[Coordinator] = []

        def one() -> bool:
            c = self.leader()
            if c is not None and c is not other_than:
                found.append(c)
                return True
            return False

        try:
            wait_for(one, timeout, "a single leading coordinator", every=0.05)
        except AssertionError as e:
            states = {c.host: (c.alive(), c.ready(), c.status()) for c in self.coordinators}
            raise AssertionError(f"{e}: {states}\n{self.log}") from None
        return found[-1]

    @property
    def log(self) -> str:
        return "\n".join(f"== {p.name}\n{p.log[-4000:]}" for p in self.coordinators + self.workers)

    def stop(self) -> None:
        for p in self.workers + self.coordinators:
            p.stop()


@contextmanager
def standby_fleet(
    kafka: str, redis_url: str, app_id: str, new_topic: Callable[..., str], tmp: Path
) -> Iterator[StandbyFleet]:
    fleet = StandbyFleet(kafka, redis_url, app_id, (new_topic(6), new_topic(2)), tmp)
    try:
        yield fleet
    finally:
        fleet.stop()


def run_standby_scenario(
    fleet: StandbyFleet,
    fault: Callable[[StandbyFleet], dict[str, Any]],
    *,
    start: Callable[[StandbyFleet], None] | None = None,
    rate: int = 1500,
    seconds: float = 8.0,
) -> dict[str, Any]:
    """Start the fleet, feed it, apply *fault*, then check the output is exactly once."""
    kafka, inp, out = fleet.kafka, fleet.input, fleet.output
    produce_pageviews(kafka, inp, rate=0, count=2000, keys=40, seed=31)
    if start is None:
        for c in fleet.coordinators:
            c.start()
            time.sleep(0.5)  # the first one leads
    else:
        start(fleet)
    for w in fleet.workers:
        w.start()
    try:
        wait_for(lambda: len(read_topic(kafka, out, idle_s=0.3)) > 0, 90, "first output")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{fleet.log}") from None
    feeding = threading.Thread(
        target=produce_pageviews,
        args=(kafka, inp),
        kwargs={"rate": rate, "duration": seconds, "keys": 40, "seed": 32},
    )
    feeding.start()
    time.sleep(seconds / 3)
    facts = fault(fleet)
    feeding.join()
    expected = collections.Counter(json.loads(m.value())["url"] for m in read_topic(kafka, inp))

    def caught_up() -> bool:
        last: dict[str, int] = {}
        for m in read_topic(kafka, out, idle_s=0.3):
            k = json.loads(m.key())
            last[k] = max(last.get(k, 0), json.loads(m.value()))
        return last == dict(expected)

    try:
        wait_for(caught_up, 120, "the output to catch up with the input", every=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{fleet.log}") from None
    check_exactly_once(read_topic(kafka, out), expected)
    r = redis.Redis.from_url(fleet.redis_url)
    stored = {
        k.decode(): json.loads(v) for k, v in r.hgetall(f"dstream:{fleet.app_id}:counts").items()
    }
    assert stored == dict(expected), "the Redis output differs from the input counts"
    return facts
