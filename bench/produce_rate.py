"""Benchmark: does ``dstream produce`` hold its target rate against a real local Kafka?

Runs the harness (via :func:`ops.tools.produce.produce_pageviews`, the same code as
``dstream produce --rate 20000 --duration 10``) into a fresh topic and prints the achieved
rate, its deviation from the target, the worst 1-second window, and the machine.
Acceptance: achieved rate within 5% of the target (exit 1 otherwise).

Kafka: ``--bootstrap``, else ``DSTREAM_KAFKA_BOOTSTRAP``, else the ``dstream dev up``
instance, else 127.0.0.1:19092; ``--private-kafka`` starts a throw-away broker instead.

    .venv/bin/python bench/produce_rate.py [--rate 20000] [--duration 10] [--procs 1]
        [--report FILE.md]

``--procs N`` splits the urls (and so the rate) across N producer processes, like
``dstream produce --procs N``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import uuid
from pathlib import Path

import confluent_kafka

from ops.tools.produce import ProduceResult, produce_pageviews, resolve_bootstrap

TOLERANCE_PCT = 5.0


def _first(v: object) -> str:
    # confluent_kafka.version() was a (str, int) tuple in older releases, a str in newer ones.
    return str(v[0]) if isinstance(v, tuple) else str(v)


def machine() -> dict[str, str]:
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        mem = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "confluent-kafka": _first(confluent_kafka.version()),
        "librdkafka": confluent_kafka.libversion()[0],
    }


def window_deviation(result: ProduceResult, rate: float, duration: float) -> tuple[float, int]:
    """Worst |window - rate| / rate in percent over the whole seconds of the run."""
    full = result.per_second[: int(duration)]
    if not full:
        return 0.0, 0
    worst = max(range(len(full)), key=lambda i: abs(full[i] - rate))
    return abs(full[worst] - rate) / rate * 100, worst


def run(bootstrap: str, args: argparse.Namespace) -> int:
    topic = f"bench-produce-{uuid.uuid4().hex[:10]}"
    result = produce_pageviews(
        bootstrap,
        topic,
        rate=args.rate,
        duration=args.duration,
        keys=args.keys,
        key_dist=args.key_dist,
        fmt=args.format,
        seed=0,
        partitions=args.partitions,
        progress=sys.stderr.isatty(),
        procs=args.procs,
    )
    dev = (result.rate - args.rate) / args.rate * 100
    wdev, wi = window_deviation(result, args.rate, args.duration)
    ok = abs(dev) <= TOLERANCE_PCT and result.errors == 0
    info = machine()
    cmd = (
        f"dstream produce --rate {args.rate:g} --duration {args.duration:g} "
        f"--keys {args.keys} --key-dist {args.key_dist} --format {args.format} "
        f"--partitions {args.partitions} --procs {args.procs}"
    )
    lines = [
        "# Producer harness rate",
        "",
        f"Command (via the API): `{cmd}` into a fresh topic, bootstrap {bootstrap}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| target rate | {args.rate:,.0f} records/s |",
        f"| records delivered | {result.records:,} in {result.seconds:.3f} s |",
        f"| achieved rate | {result.rate:,.1f} records/s |",
        f"| deviation from target | {dev:+.2f}% (acceptance: within {TOLERANCE_PCT:g}%) |",
        f"| worst 1-second window | {wdev:.2f}% (second {wi}) |",
        f"| per-second counts | {', '.join(str(c) for c in result.per_second)} |",
        f"| producer processes | {args.procs} (records each: "
        f"{', '.join(f'{n:,}' for n in result.per_process)}) |",
        f"| delivery errors | {result.errors} |",
        f"| verdict | {'PASS' if ok else 'FAIL'} |",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.report:
        Path(args.report).write_text(text)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rate", type=float, default=20_000.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--keys", type=int, default=1_000)
    p.add_argument("--key-dist", choices=("uniform", "zipf"), default="uniform")
    p.add_argument("--format", choices=("json", "msgpack"), default="json")
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--procs", type=int, default=1, help="producer processes (default: 1)")
    p.add_argument("--bootstrap")
    p.add_argument("--private-kafka", action="store_true", help="start a throw-away broker")
    p.add_argument("--report", help="also write the markdown report to this file")
    args = p.parse_args()
    if args.rate <= 0 or args.duration <= 0:
        p.error("--rate and --duration must be positive for a rate benchmark")
    if not args.private_kafka:
        return run(resolve_bootstrap(args.bootstrap), args)
    from ops.tools.devservices import DevServices

    with tempfile.TemporaryDirectory(prefix="dstream-bench-") as home:
        services = DevServices(Path(home), environ={})
        with services:
            return run(services.kafka_bootstrap, args)


if __name__ == "__main__":
    sys.exit(main())
