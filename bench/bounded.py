"""Bounded runs (#15): the page-view running count over a pre-loaded backlog, three ways.

One pre-loaded topic (``--records`` page views, ``--partitions`` partitions, ``--keys``
urls), one broker, one run, the variants in turn:

(a) ``plain``: the plain consume-decode-count loop of :mod:`bench.throughput`;
(b) ``bounded-2w``: ``dstream run examples/pageviews.py --workers 2 --until end``, timed
    from its launch to its exit 0 (the whole job, start-up included), and by its own
    summary line (``bounded run finished: N records, B batches, S seconds``: from the
    first batch to the last commit);
(c) ``live-2w``: ``dstream run examples/pageviews.py --workers 2`` on the same backlog
    (a live app catching up), timed until its completed batches cover the topic, from
    launch and from ready (:func:`bench.throughput.fleet_run`).

Every fleet gets a fresh app id (it starts at the earliest offset). The fleets' final
running counts (read back ``read_committed``) are checked against the plain loop's.

    .venv/bin/python -m bench.bounded [--records 5000000] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from bench import _common as c
from bench.throughput import _final_counts, fleet_run, plain_loop

VARIANTS = ("plain", "bounded-2w", "live-2w")
APP = "examples/pageviews.py"
SUMMARY = re.compile(r"bounded run finished: (\d+) records, (\d+) batches, ([0-9.]+) seconds")


def bounded_run(
    workers: int, bootstrap: str, topic: str, interval: float, timeout: float
) -> dict[str, Any]:
    """``dstream run APP --until end``: wait for its exit; its summary and final counts."""
    _, redis_url = c.services()
    out_topic = c.unique("bench-counts")
    c.create_topic(bootstrap, out_topic, 1)
    app_id = c.unique("bench-bounded")
    env = {
        **os.environ,
        "DSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "DSTREAM_REDIS_URL": redis_url,
        "DSTREAM_APP_ID": app_id,
        "DSTREAM_LOG_LEVEL": "WARNING",
        "DSTREAM_BATCH_INTERVAL": str(interval),
        "PAGEVIEWS_TOPIC": topic,
        "PAGEVIEWS_OUTPUT": out_topic,
    }
    log_dir = c.RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{app_id}.log"
    cmd = [sys.executable, "-m", "ops.cli", "run", APP, "--workers", str(workers)]
    t0 = time.monotonic()
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(
            [*cmd, "--until", "end"],
            cwd=c.ROOT,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            code = None
    seconds = time.monotonic() - t0
    c.cleanup_redis(app_id)
    m = SUMMARY.search(log_path.read_text(errors="replace"))
    if code != 0 or m is None:
        msg = f"the bounded run exited with {code}; see {log_path}"
        raise RuntimeError(msg)
    return {
        "processed": int(m.group(1)),
        "batches_n": int(m.group(2)),
        "from_ready": float(m.group(3)),
        "from_launch": seconds,
        "finals": _final_counts(bootstrap, out_topic),
        "exit": code,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--records", type=int, default=5_000_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--keys", type=int, default=1_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--interval", type=float, default=1.0, help="batch interval, seconds")
    p.add_argument("--timeout", type=float, default=600.0, help="per fleet variant, seconds")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--fragment", default="bounded.md")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    c.print_machine()
    bootstrap, _ = c.services()
    topic = f"bench-pageviews-{args.records}-{args.partitions}p-{args.keys}k"
    total = c.preload(bootstrap, topic, args.records, args.partitions, args.keys)

    results: dict[str, dict[str, Any]] = {}
    expected: collections.Counter[str] | None = None
    for v in variants:
        if v == "plain":
            seconds, expected = plain_loop(bootstrap, topic, total)
            results[v] = {"from_ready": seconds, "from_launch": seconds, "processed": total}
        elif v == "bounded-2w":
            results[v] = bounded_run(args.workers, bootstrap, topic, args.interval, args.timeout)
        elif v == "live-2w":
            r = fleet_run(APP, args.workers, bootstrap, topic, total, args.interval, args.timeout)
            r["batches_n"] = len(r["batches"])
            results[v] = r
        else:
            continue
        r = results[v]
        if "finals" in r:
            r["exact"] = expected is None or r["finals"] == dict(expected)
        print(
            f"{v}: {r['processed']:,} records; {total / r['from_ready']:,.0f}/s from ready, "
            f"{total / r['from_launch']:,.0f}/s from launch; exact: {r.get('exact', '-')}",
            flush=True,
        )
    text = report(results, total, args)
    print(text)
    c.write_fragment(args.fragment, text)
    return 0


def report(results: dict[str, dict[str, Any]], total: int, args: argparse.Namespace) -> str:
    base = total / results["plain"]["from_ready"] if "plain" in results else float("nan")
    lines = [
        "## Bounded runs (#15)",
        "",
        f"Command: `.venv/bin/python -m bench.bounded --records {args.records} "
        f"--partitions {args.partitions} --keys {args.keys} --workers {args.workers} "
        f"--interval {args.interval}`. Machine: {c.machine_line()}.",
        "",
        f"Input: {total:,} JSON page views pre-loaded into one topic, {args.partitions} "
        f"partitions, {args.keys} urls; the app is `{APP}` (running count per url, "
        "exactly-once Kafka output), unchanged in every variant.",
        "",
        "| variant | records/s (from ready) | ratio to plain | records/s (from launch) "
        "| ratio (launch) | batches | exit | counts exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, r in results.items():
        rate = total / r["from_ready"]
        rate_l = total / r["from_launch"]
        lines.append(
            f"| {v} | {rate:,.0f} | {rate / base:.2f}x | {rate_l:,.0f} | {rate_l / base:.2f}x "
            f"| {r.get('batches_n', '-')} | {r.get('exit', '-')} | {r.get('exact', '-')} |"
        )
    lines += [
        "",
        "plain: timed from `assign()` to its last record (both columns). bounded-2w: from "
        "ready = its summary line (first batch to last commit, while the batch clock cuts "
        "each batch as soon as the one before completed); from launch = `dstream run` start "
        "to its exit 0 (start-up, Finish and shutdown included). live-2w: until completed "
        "batches (per `/api/status`) add up to the topic; from ready = receivers assigned.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
