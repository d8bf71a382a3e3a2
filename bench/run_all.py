"""``make bench``: every benchmark in turn, then ``bench/results/REPORT.md``.

Order: throughput (it measures the maximum rate the others scale from), latency, smallest
stable interval, memory soak (``--soak-minutes``, 10 by default, the issue's figure),
coordinator scale (50 to 1,000 simulated workers, and recovery from a lost one),
coordinator memory at 1,000 simulated workers over 10 simulated minutes, worker profile,
recovery from a killed worker (checkpoints every 2, 10, 30 batches), straggler with and
without speculation, failover to a standby coordinator (kill -9 and SIGSTOP of the leader),
taking over an output partition's transactional id up to its first commit, metadata
written to Redis per batch (1,000 workers x 4 partitions), connections per worker (24 real
worker processes), bounded runs (``--until end`` over 5 M pre-loaded records).
Each step writes a markdown fragment and its PNGs into ``bench/results/``; a step that
fails is reported as failed and the others still run. Needs ``dstream dev up`` (the
``make bench`` target starts it).

    .venv/bin/python -m bench.run_all [--quick] [--soak-minutes 10] [--only throughput,scale]

``--quick`` shrinks every step (400k records, 10 s latency runs, 1-minute soak, 50/100
workers, 90 simulated seconds at 200 workers) to check the suite itself in about five
minutes; its figures are not the report's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable

from bench import _common as c

STEPS = (
    "throughput",
    "latency",
    "interval",
    "soak",
    "scale",
    "scale_memory",
    "profile",
    "recovery",
    "straggler",
    "failover",
    "txn_takeover",
    "metadata",
    "connections",
    "bounded",
)


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=c.ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "engine", "ops", "ingest", "state"],
            cwd=c.ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' + uncommitted engine changes' if dirty else ''}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument("--only", default=",".join(STEPS))
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    q = args.quick
    from bench import (
        bounded,
        connections,
        failover,
        interval,
        latency,
        metadata,
        profile_fleet,
        recovery,
        scale,
        scale_memory,
        soak,
        straggler,
        throughput,
        txn_takeover,
    )

    plan: dict[str, tuple[Callable[[list[str]], int], list[str]]] = {
        "throughput": (throughput.main, ["--records", "400000" if q else "2000000"]),
        "latency": (latency.main, ["--duration", "10" if q else "20"]),
        "interval": (interval.main, ["--duration", "8" if q else "15"]),
        "soak": (soak.main, ["--minutes", "1.2" if q else f"{args.soak_minutes:g}"]),
        "scale": (
            scale.main,
            ["--workers", "50,100", "--recovery-workers", "100", "--profile-workers", "100"]
            if q
            else ["--workers", "50,100,200,400,1000"],
        ),
        "scale_memory": (
            scale_memory.main,
            ["--workers", "200", "--minutes", "1.5"] if q else ["--minutes", "10"],
        ),
        "profile": (profile_fleet.main, ["--seconds", "10"]),
        "recovery": (
            recovery.main,
            ["--checkpoints", "2,10", "--steady", "8", "--after", "12"] if q else [],
        ),
        "straggler": (straggler.main, ["--seconds", "10" if q else "20"]),
        "failover": (failover.main, ["--steady", "6", "--after", "12"] if q else []),
        "txn_takeover": (txn_takeover.main, ["--tries", "5" if q else "20"]),
        "metadata": (metadata.main, ["--batches", "50" if q else "200"]),
        "connections": (
            connections.main,
            ["--workers", "8", "--seconds", "20", "--caps", "32,4"] if q else [],
        ),
        "bounded": (bounded.main, ["--records", "400000" if q else "5000000"]),
    }
    status: dict[str, str] = {}
    c.print_machine()
    commit = _commit()
    t_all = time.monotonic()
    for step in STEPS:
        if step not in only:
            continue
        fn, step_args = plan[step]
        print(f"\n=== {step}: {' '.join(step_args)}", flush=True)
        t0 = time.monotonic()
        try:
            code = fn(step_args)
            status[step] = f"ok ({time.monotonic() - t0:.0f} s)" if code == 0 else f"exit {code}"
        except Exception as e:  # one broken step must not hide the others' figures
            status[step] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"{step} failed: {e}", flush=True)
    write_report(status, commit, time.monotonic() - t_all, args)
    return 0 if all(s.startswith("ok") for s in status.values()) else 1


def write_report(status: dict[str, str], commit: str, seconds: float, args: object) -> None:
    parts = [
        "# dstream-fleet benchmark report",
        "",
        "Generated by `make bench` (`.venv/bin/python -m bench.run_all`); every figure below "
        "comes from the command printed beside it, run on this machine against the local "
        "Kafka and Redis of `dstream dev up` (loopback only). Ratios are measured in one run.",
        "",
        "Machine: " + c.machine_line() + ".",
        "",
        f"Code: commit {commit}. Suite time: {seconds / 60:.1f} min.",
        "",
        "| step | status |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in status.items()],
        "",
    ]
    summary = c.RESULTS / "SUMMARY.md"
    if summary.exists():
        parts += [summary.read_text(), ""]
    for frag in STEPS:
        f = c.RESULTS / f"{frag}.md"
        if f.exists():
            parts += [f.read_text(), ""]
    text = "\n".join(parts)
    (c.RESULTS / "REPORT.md").write_text(text)
    print(f"wrote {(c.RESULTS / 'REPORT.md').relative_to(c.ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
