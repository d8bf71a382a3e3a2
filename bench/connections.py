"""Connections per worker: 24 real worker processes at low load, and exact output.

A fleet of ``--workers`` (default 24) worker processes and a coordinator
(``dstream run examples/pageviews.py``: running count per url, ``to_kafka``) on this
machine, 1 s batches, ``--partitions`` input partitions (default 48, two per worker) fed
``--rate`` page views/s (default 200) for ``--seconds`` (default 60). Every 5 s each
process's TCP connections are read from ``/proc/PID/fd`` and ``/proc/net/tcp{,6}`` and
sorted by the other end: worker -> peer worker RPC (what ``DSTREAM_PEER_CONNECTIONS``
bounds), inbound RPC (from the coordinator and from peers), coordinator, Redis, Kafka.
Once the fleet processed every produced record, ``dstream verify`` checks the output
against the reference. One run per ``--caps`` value of ``DSTREAM_PEER_CONNECTIONS``: the
default (32, above the fleet size: every connection reused) and one below the fleet size
(the bound in force: fetches to the least recently used holders reconnect).

Kafka and Redis: the ``dstream dev up`` ones when they run, else private ones on free
loopback ports (started for the run, stopped after).

    .venv/bin/python -m bench.connections [--workers 24] [--seconds 60] [--caps 32,8]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench import _common as c

SAMPLE_EVERY_S = 5.0
KINDS = ("to peers", "inbound", "to coordinator", "redis", "kafka", "other")
#: /proc/net/tcp states
_ESTABLISHED, _LISTEN = "01", "0A"


@contextlib.contextmanager
def services() -> Iterator[None]:
    """Point ``DSTREAM_KAFKA_BOOTSTRAP`` / ``DSTREAM_REDIS_URL`` at running services."""
    from ops.tools.devservices import DevServices, discovered_env

    found = discovered_env()
    if found.get("kafka_bootstrap") and found.get("redis_url"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="bench-connections-") as d:
        dev = DevServices(Path(d))
        try:
            os.environ["DSTREAM_KAFKA_BOOTSTRAP"] = dev.kafka_bootstrap
            os.environ["DSTREAM_REDIS_URL"] = dev.redis_url
            yield
        finally:
            os.environ.pop("DSTREAM_KAFKA_BOOTSTRAP", None)
            os.environ.pop("DSTREAM_REDIS_URL", None)
            dev.close()


# --------------------------------------------------------------------------- /proc
Endpoint = tuple[str, int]


def _endpoint(text: str) -> Endpoint:
    host, port = text.split(":")
    return host, int(port, 16)


def tcp_table() -> dict[int, tuple[Endpoint, Endpoint, str]]:
    """Socket inode -> (local, remote, state) of every TCP socket of this host."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                f = line.split()
                out[int(f[9])] = (_endpoint(f[1]), _endpoint(f[2]), f[3])
    return out


def socket_inodes(pid: int) -> tuple[set[int], int]:
    """The socket inodes among *pid*'s open fds, and its number of open fds."""
    inodes, fds = set(), 0
    with contextlib.suppress(OSError):
        for fd in (Path("/proc") / str(pid) / "fd").iterdir():
            fds += 1
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes, fds


def sample(
    coordinator: int, workers: list[int], redis_port: int, kafka_port: int
) -> dict[str, Any]:
    """Connections of every fleet process now, sorted by what is at the other end."""
    table = tcp_table()
    socks = {pid: socket_inodes(pid) for pid in [coordinator, *workers]}
    listen: dict[int, set[int]] = {}
    owner: dict[int, int] = {}  # local port of an established socket -> its pid
    for pid, (inodes, _fds) in socks.items():
        for i in inodes:
            if i in table:
                local, _remote, state = table[i]
                if state == _LISTEN:
                    listen.setdefault(pid, set()).add(local[1])
                elif state == _ESTABLISHED:
                    owner[local[1]] = pid
    worker_ports = {p for w in workers for p in listen.get(w, set())}
    coord_ports = listen.get(coordinator, set())
    per_worker = []
    for pid in workers:
        inodes, fds = socks[pid]
        kinds = dict.fromkeys(KINDS, 0)
        for i in inodes:
            if i not in table or table[i][2] != _ESTABLISHED:
                continue
            local, remote, _ = table[i]
            if local[1] in listen.get(pid, set()):
                kinds["inbound"] += 1
            elif remote[1] in worker_ports:
                kinds["to peers"] += 1
            elif remote[1] in coord_ports:
                kinds["to coordinator"] += 1
            elif remote[1] == redis_port:
                kinds["redis"] += 1
            elif remote[1] == kafka_port:
                kinds["kafka"] += 1
            else:
                kinds["other"] += 1
        per_worker.append({"pid": pid, "fds": fds, **kinds})
    c_inodes, c_fds = socks[coordinator]
    c_est = [table[i] for i in c_inodes if i in table and table[i][2] == _ESTABLISHED]
    return {
        "workers": per_worker,
        "coordinator": {
            "fds": c_fds,
            "tcp": len(c_est),
            "to workers": sum(1 for _l, r, _s in c_est if r[1] in worker_ports),
        },
        "owner": owner,
    }


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace, cap: int) -> dict[str, Any]:
    bootstrap, redis_url = c.services()
    topic, output = c.unique("conn-in"), c.unique("conn-out")
    c.create_topic(bootstrap, topic, args.partitions)
    env = {
        "PAGEVIEWS_TOPIC": topic,
        "PAGEVIEWS_OUTPUT": output,
        "DSTREAM_BATCH_INTERVAL": f"{args.interval:g}",
        "DSTREAM_PEER_CONNECTIONS": str(cap),
        "DSTREAM_APP_ID": c.unique("conn"),
    }
    samples: list[dict[str, Any]] = []
    delays: list[float] = []
    with c.run_fleet(
        "examples/pageviews.py", workers=args.workers, env=env, log_dir=c.RESULTS / "logs"
    ) as fleet:
        t0 = time.monotonic()
        fleet.wait_ready(timeout=300)
        ready_s = time.monotonic() - t0
        roles = fleet.roles()
        (coordinator,) = roles["coordinator"]
        workers = roles["worker"]
        cpu0 = {p: c.cpu_seconds(p) for p in [coordinator, *workers]}
        print(f"cap {cap}: {len(workers)} workers ready in {ready_s:.0f} s", flush=True)
        redis_port = urlparse(redis_url).port or 6379
        kafka_port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
        next_sample = time.monotonic()
        with c.producer(topic, args.rate, args.seconds, args.partitions) as prod:
            while prod.poll() is None:
                fleet.status()
                if time.monotonic() >= next_sample:
                    samples.append(sample(coordinator, workers, redis_port, kafka_port))
                    next_sample += SAMPLE_EVERY_S
                time.sleep(0.5)
        cpu_s = {p: c.cpu_seconds(p) - cpu0[p] for p in cpu0}
        produced = sum(c.topic_size(bootstrap, topic).values())
        deadline = time.monotonic() + 120
        while fleet.processed() < produced and time.monotonic() < deadline:
            fleet.status()
            time.sleep(0.5)
        samples.append(sample(coordinator, workers, redis_port, kafka_port))
        processed = fleet.processed()
        delays = [b["total_delay"] for b in fleet.seen.values() if b.get("total_delay") is not None]
        verify = subprocess.run(
            [
                sys.executable,
                "-m",
                "ops.cli",
                "verify",
                "--app",
                "examples/pageviews.py",
                "--input",
                topic,
                "--output",
                output,
                "--app-id",
                env["DSTREAM_APP_ID"],
                "--wait",
                "60s",
                "--max-print",
                "5",
            ],
            cwd=c.ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=False,
        )
        log_tail = fleet.log_tail(10)
    summary = (verify.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"cap {cap}: {summary}", flush=True)
    if verify.returncode != 0:
        print(verify.stdout[-3000:], verify.stderr[-2000:], log_tail, sep="\n", flush=True)
    peers_max = [max(s["workers"][i]["to peers"] for s in samples) for i in range(len(workers))]
    last = samples[-1]
    return {
        "cap": cap,
        "workers": len(workers),
        "ready_s": ready_s,
        "produced": produced,
        "processed": processed,
        "verify_ok": verify.returncode == 0,
        "verify": summary,
        "samples": len(samples),
        "peers_max": peers_max,
        "last": last,
        "coordinator_fds_max": max(s["coordinator"]["fds"] for s in samples),
        "coordinator_tcp_max": max(s["coordinator"]["tcp"] for s in samples),
        "worker_fds_max": max(w["fds"] for s in samples for w in s["workers"]),
        "worker_cpu_s": statistics.median(cpu_s[p] for p in workers),
        "coordinator_cpu_s": cpu_s[coordinator],
        "delay_p50": c.pct(delays, 0.5),
        "delay_p99": c.pct(delays, 0.99),
    }


def _spread(values: list[int]) -> str:
    return f"{min(values)} / {statistics.median(values):g} / {max(values)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=24)
    p.add_argument("--partitions", type=int, default=48)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--caps", default="32,8", help="DSTREAM_PEER_CONNECTIONS values, one run each")
    p.add_argument("--fragment", default="connections.md")
    args = p.parse_args(argv)
    c.print_machine()
    rows = []
    with services():
        for cap in [int(x) for x in args.caps.split(",") if x]:
            r = run(args, cap)
            rows.append(r)
            w = r["last"]["workers"]
            print(
                f"cap {cap}: peer connections per worker (max over the run) "
                f"{_spread(r['peers_max'])}; at the end: to peers "
                f"{_spread([x['to peers'] for x in w])}, "
                f"inbound {_spread([x['inbound'] for x in w])}, kafka "
                f"{_spread([x['kafka'] for x in w])}, redis {_spread([x['redis'] for x in w])}, "
                f"fds {_spread([x['fds'] for x in w])}; coordinator fds max "
                f"{r['coordinator_fds_max']}, tcp {r['coordinator_tcp_max']}; worker CPU "
                f"{r['worker_cpu_s']:.1f} s; delay p50 {r['delay_p50']:.2f} s p99 "
                f"{r['delay_p99']:.2f} s; verify {'OK' if r['verify_ok'] else 'FAILED'}",
                flush=True,
            )
    cmd = (
        f"--workers {args.workers} --partitions {args.partitions} --rate {args.rate:g} "
        f"--seconds {args.seconds:g} --caps {args.caps}"
    )
    lines = [
        "### Connections per worker",
        "",
        f"Command: `.venv/bin/python -m bench.connections {cmd}`. Machine: {c.machine_line()}.",
        "",
        f"`examples/pageviews.py` on {args.workers} worker processes and a coordinator on this "
        f"machine, {args.interval:g} s batches, {args.partitions} input partitions, "
        f"{args.rate:g} page views/s for {args.seconds:g} s. Connections read from `/proc` every "
        f"{SAMPLE_EVERY_S:g} s (established TCP, by the other end); min / median / max over the "
        "workers. *To peers*: the worker's RPC clients of other workers (replication and "
        "fetches), bounded by `DSTREAM_PEER_CONNECTIONS`; *inbound*: the coordinator's and "
        "the peers' connections to the worker's RPC server; Kafka: librdkafka's broker "
        "connections (receivers' consumer, sink producers and marker consumers).",
        "",
        "| DSTREAM_PEER_CONNECTIONS | to peers, max over the run | at the end: to peers | "
        "inbound | to coordinator | Kafka | Redis | worker fds (max) | coordinator fds (max) "
        "| coordinator TCP (max) | worker CPU (median) | batch total delay p50 / p99 | "
        "output |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["last"]["workers"]
        lines.append(
            f"| {r['cap']} | {_spread(r['peers_max'])} | {_spread([x['to peers'] for x in w])} "
            f"| {_spread([x['inbound'] for x in w])} | "
            f"{_spread([x['to coordinator'] for x in w])} | {_spread([x['kafka'] for x in w])} "
            f"| {_spread([x['redis'] for x in w])} | {r['worker_fds_max']} | "
            f"{r['coordinator_fds_max']} | {r['coordinator_tcp_max']} | "
            f"{r['worker_cpu_s']:.1f} s | {r['delay_p50']:.2f} / {r['delay_p99']:.2f} s | "
            f"{'exact' if r['verify_ok'] else 'DIFFERENCES'} ({r['processed']:,} of "
            f"{r['produced']:,} records processed) |"
        )
    lines += ["", *[f"- cap {r['cap']}: `{r['verify']}`" for r in rows], ""]
    c.write_fragment(args.fragment, "\n".join(lines))
    return 0 if all(r["verify_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
