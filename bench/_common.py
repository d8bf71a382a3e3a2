"""Shared helpers of the benchmark suite: machine facts, topics, fleets, status polling.

Everything here talks to the local services ``dstream dev up`` started (found through
:func:`ops.services.settings_from`) over loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka import Consumer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


# --------------------------------------------------------------------------- machine
def _first(v: object) -> str:
    return str(v[0]) if isinstance(v, tuple) else str(v)


def machine() -> dict[str, str]:
    """Cores, memory, CPU model, OS, Python, Kafka and client versions of this machine."""
    from ops.tools.devservices import KAFKA_VERSION

    mem = "unknown"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": str(os.cpu_count()),
        "memory": mem,
        "cpu": cpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "kafka": f"Apache Kafka {KAFKA_VERSION} (single-node KRaft, dstream dev up)",
        "confluent-kafka": _first(confluent_kafka.version()),
        "librdkafka": confluent_kafka.libversion()[0],
    }


def machine_line() -> str:
    return ", ".join(f"{k}: {v}" for k, v in machine().items())


def print_machine() -> None:
    print("machine: " + machine_line(), flush=True)


# --------------------------------------------------------------------------- services
def services() -> tuple[str, str]:
    """(Kafka bootstrap, Redis URL) of the local dev services."""
    from ops.services import settings_from
    from ops.tools.devservices import use_dev_services

    use_dev_services()
    s = settings_from()
    return s.kafka_bootstrap, s.redis_url.get_secret_value()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def topic_size(bootstrap: str, topic: str) -> dict[int, int]:
    """High watermark per partition (0 for a missing topic)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("bench-wm")})
    try:
        md = c.list_topics(topic, timeout=10)
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            return {}
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in t.partitions
        }
    finally:
        c.close()


def preload(bootstrap: str, topic: str, count: int, partitions: int, keys: int) -> int:
    """Make sure *topic* holds exactly *count* page views; reuse it when it already does."""
    from ops.tools.produce import produce_pageviews

    have = topic_size(bootstrap, topic)
    if sum(have.values()) == count and len(have) == partitions:
        print(f"reusing pre-loaded topic {topic} ({count:,} records)", flush=True)
        return count
    if have:
        msg = f"topic {topic} exists with {sum(have.values())} records, expected {count}"
        raise SystemExit(msg)
    t0 = time.monotonic()
    r = produce_pageviews(
        bootstrap, topic, rate=0, count=count, keys=keys, partitions=partitions, seed=11
    )
    print(
        f"pre-loaded {r.records:,} page views into {topic} ({partitions} partitions, "
        f"{keys} urls) in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
    if r.errors:
        msg = f"{r.errors} records were not delivered"
        raise SystemExit(msg)
    return r.records


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from ops.tools.produce import ensure_topic

    ensure_topic(bootstrap, topic, partitions)


# --------------------------------------------------------------------------- fleets
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append(int(d.name))
    return sorted(out)


def cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
    return []


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of *pid* so far."""
    with contextlib.suppress(OSError):
        f = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


@dataclass
class Fleet:
    """A running ``dstream run APP --workers N`` (own process group) and its status page."""

    proc: subprocess.Popen[bytes]
    http_port: int
    log_path: Path
    app_id: str
    seen: dict[int, dict[str, Any]] = field(default_factory=dict)

    def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.http_port}/api/status"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                st: dict[str, Any] = json.loads(r.read())
        except (OSError, ValueError):
            return None
        for b in st.get("batches", []):
            self.seen[b["batch"]] = b
        return st

    def processed(self) -> int:
        """Records of every completed batch seen so far (poll :meth:`status` often)."""
        return sum(b["records"] for b in self.seen.values())

    def roles(self) -> dict[str, list[int]]:
        """pids of the coordinator and of the workers (children of the run process)."""
        out: dict[str, list[int]] = {"coordinator": [], "worker": []}
        for pid in _children(self.proc.pid):
            cl = cmdline(pid)
            for role in out:
                if role in cl:
                    out[role].append(pid)
        return out

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"the fleet exited with {self.proc.returncode}:\n{self.log_tail()}"
                raise RuntimeError(msg)
            st = self.status()
            if st is not None and st.get("receivers"):
                return
            time.sleep(0.1)
        msg = f"the fleet was not ready after {timeout}s:\n{self.log_tail()}"
        raise RuntimeError(msg)

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


@contextlib.contextmanager
def run_fleet(
    app: str,
    *,
    workers: int,
    env: dict[str, str],
    log_dir: Path,
) -> Iterator[Fleet]:
    """Start a local fleet with a fresh app id; always stopped (SIGINT, then SIGKILL)."""
    from ops.tools.devservices import free_port

    bootstrap, redis_url = services()
    port = free_port()
    app_id = env.get("DSTREAM_APP_ID") or unique("bench")
    full = {
        **os.environ,
        "DSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_HTTP_PORT": str(port),
        "DSTREAM_LOG_LEVEL": "WARNING",
        **env,
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{app_id}.log"
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "run", app, "--workers", str(workers)],
            cwd=ROOT,
            env=full,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fleet = Fleet(proc, port, log_path, app_id)
        try:
            yield fleet
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                    proc.wait(30)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            cleanup_redis(app_id)


def cleanup_redis(app_id: str) -> None:
    """Drop the Redis keys of a finished bench app (its id prefixes them)."""
    import redis

    _, url = services()
    with contextlib.suppress(Exception):
        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(match=f"*{app_id}*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i : i + 500])


# --------------------------------------------------------------------------- figures
def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of *values*, nearest-rank on the sorted list."""
    if not values:
        return float("nan")
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    """``met`` or ``missed by X%`` (relative to the target)."""
    if value != value:  # NaN
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "met"
    return f"missed by {abs(value - target) / target * 100:.0f}%"


def write_fragment(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / name
    p.write_text(text)
    print(f"wrote {p.relative_to(ROOT)}", flush=True)
    return p


def plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


# --------------------------------------------------------------------------- load
@contextlib.contextmanager
def producer(
    topic: str, rate: float, duration: float, partitions: int = 4, procs: int = 1
) -> Iterator[Any]:
    """``dstream produce [--procs N]`` in a child process group (its CPU is not the bench's GIL)."""
    bootstrap, _ = services()
    cmd = [
        sys.executable,
        "-m",
        "ops.cli",
        "produce",
        "--topic",
        topic,
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{duration:g}",
        "--partitions",
        str(partitions),
        "--bootstrap",
        bootstrap,
        "--no-progress",
        "--procs",
        str(procs),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


MAX_RATE_FILE = RESULTS / "max_rate.json"


def add_load_args(p: Any) -> None:
    """Options of the benches that run a fleet under a steady produced load."""
    p.add_argument("--rate", type=float, help="records/s (default: 20%% of the max rate)")
    p.add_argument("--level", type=float, default=0.2, help="share of the max rate")
    p.add_argument("--max-rate", type=float)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--warmup", type=float, default=5.0)


def run_rate(rate: float | None, level: float, explicit_max: float | None) -> tuple[float, str]:
    """The records/s a run feeds and how it was chosen: ``--rate``, else *level* of the max."""
    if rate:
        return rate, "given with --rate"
    mx, src = max_rate(explicit_max)
    return round(mx * level), f"{level:.0%} of {mx:,.0f}/s ({src})"


def max_rate(explicit: float | None = None) -> tuple[float, str]:
    """The fleet's measured maximum rate (records/s) and where it came from.

    ``--max-rate`` if given, else the 2-worker page-view figure the last
    ``bench/throughput.py`` run saved in ``bench/results/max_rate.json``, else a quick probe
    (a 400k-record throughput run of the 2-worker fleet).
    """
    if explicit:
        return explicit, "given with --max-rate"
    with contextlib.suppress(OSError, ValueError, KeyError):
        d = json.loads(MAX_RATE_FILE.read_text())
        return float(d["rate"]), f"bench/throughput.py fleet-2w ({d['when']})"
    from bench import throughput

    throughput.main(
        ["--records", "400000", "--variants", "fleet-2w", "--fragment", "probe.md", "--no-plot"]
    )
    d = json.loads(MAX_RATE_FILE.read_text())
    return float(d["rate"]), "quick probe (400k records, fleet-2w)"
