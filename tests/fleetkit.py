"""Helpers for tests that run a real fleet: start `dstream run`, read topics, wait."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent


def read_topic(
    bootstrap: str, topic: str, committed: bool = True, idle_s: float = 1.5
) -> list[Any]:
    """Every message of *topic* (read_committed by default), in partition/offset order."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
        }
    )
    try:
        md = c.list_topics(topic, timeout=10)
        parts = md.topics[topic].partitions
        ends = {}
        for p in parts:
            _lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = hi
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[Any] = []
        deadline = time.monotonic() + 60
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            msgs = c.consume(10000, 0.2)
            if msgs:
                idle_since = time.monotonic()
                out.extend(m for m in msgs if m.error() is None)
            elif time.monotonic() - idle_since > idle_s:
                break
        return out
    finally:
        c.close()


def last_values(messages: list[Any]) -> dict[Any, Any]:
    """Last JSON value per JSON key, in batch order (header ``dstream-batch``)."""

    def batch(m: Any) -> int:
        return int(dict(m.headers() or [])["dstream-batch"])

    out: dict[Any, Any] = {}
    for m in sorted(messages, key=lambda m: (batch(m), m.partition(), m.offset())):
        out[json.loads(m.key())] = json.loads(m.value())
    return out


#: Loopback requests never go through a proxy, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(port: int) -> dict[str, Any]:
    """The coordinator's ``GET /api/status`` on this host."""
    with _OPENER.open(f"http://127.0.0.1:{port}/api/status", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def leader_batches(status: dict[str, Any]) -> int:
    """Completed batches in a status; 0 while the coordinator does not lead yet.

    A coordinator serves HTTP (and ``dstream status``) before it holds the lease; until
    then its status is the standby view (``role: standby``), which has no batches.
    """
    return len(status["batches"]) if status["role"] == "leader" else 0


def completed_batches(port: int) -> int:
    """Completed batches the coordinator on *port* reports; 0 while not up or not leading."""
    try:
        return leader_batches(http_status(port))
    except OSError:
        return 0


def wait_for(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Fleet:
    def __init__(self, proc: subprocess.Popen[str], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def interrupt(self, timeout: float = 30.0) -> int:
        """Ctrl-C the fleet (SIGINT to its process group, as a terminal does)."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout)


@contextmanager
def run_fleet(
    app: str, *, workers: int, env: dict[str, str], tmp: Path, args: tuple[str, ...] = ()
) -> Iterator[Fleet]:
    """`dstream run APP --workers N` in its own process group; always stopped after."""
    log_path = tmp / f"fleet-{time.monotonic_ns()}.log"
    full_env = {**os.environ, **env}
    with log_path.open("w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "run", app, "--workers", str(workers), *args],
            cwd=ROOT,
            env=full_env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        fleet = Fleet(proc, log_path)
        try:
            yield fleet
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                    proc.wait(30)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, cmdline) of the direct children of *pid* (Linux /proc)."""
    out: list[tuple[int, str]] = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append((int(d.name), cmd))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


def role_pids(fleet: Fleet, role: str) -> list[int]:
    """Pids of the fleet's live processes of *role* (``coordinator`` or ``worker``)."""
    return [p for p, cmd in children(fleet.proc.pid) if f" {role} " in f" {cmd} "]


def fleet_env(
    kafka: str,
    redis_url: str,
    app_id: str,
    pageviews: tuple[str, str] | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of a test fleet: its Kafka, Redis and app id, plus *extra* variables.

    *pageviews* is the (input, output) topic pair of the page-view apps
    (``PAGEVIEWS_TOPIC``, ``PAGEVIEWS_OUTPUT``).
    """
    env = {
        "DSTREAM_KAFKA_BOOTSTRAP": kafka,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
    }
    if pageviews is not None:
        env["PAGEVIEWS_TOPIC"], env["PAGEVIEWS_OUTPUT"] = pageviews
    env.update(extra)
    return env
