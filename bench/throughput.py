"""Throughput: the page-view fleet against a plain confluent-kafka loop, in one run.

One pre-loaded topic (``--records`` page views, ``--partitions`` partitions, ``--keys``
urls), one broker, one run, four variants in turn:

(a) ``plain``: one process, ``Consumer.consume(10000)`` over every partition, ``json.loads``
    per record, counting urls in a ``collections.Counter`` (C-accelerated update);
(b) ``fleet-1w``: ``dstream run examples/pageviews.py --workers 1``;
(c) ``fleet-2w``: the same with ``--workers 2``;
(d) ``windowed-2w``: ``dstream run examples/windowed_pageviews.py --workers 2`` (running
    count plus a 10 s / 1 s windowed count);
(e) ``fleet-2w-nometrics``: (c) with ``DSTREAM_METRICS=false`` (every metric a no-op): the
    cost of metrics is the ratio of (c) to (e), target at most 3 %.

Each fleet gets a fresh app id, so it starts at the earliest offset. Its throughput is the
topic size divided by the time until the coordinator's ``/api/status`` shows completed
batches (every output committed) whose records add up to the topic size. Two clocks are
reported: from the fleet's launch (``dstream run`` start-up included) and from the moment
it is ready (receivers assigned, batch clock running); the plain loop is timed from its
``assign()``, which is the comparable moment. The ratio uses the *ready* clock; the
launch-clock ratio is printed beside it. The fleet's final running counts (read back
``read_committed``) are checked against the plain loop's counts.

    .venv/bin/python -m bench.throughput [--records 3000000] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench import _common as c

VARIANTS = ("plain", "fleet-1w", "fleet-2w", "windowed-2w", "fleet-2w-nometrics", "plain-again")
#: What metrics may cost: fleet-2w's throughput at least this share of fleet-2w-nometrics'.
METRICS_COST_MAX = 0.03
TARGETS = {"fleet-1w": 0.6, "fleet-2w": 1.0}


def plain_loop(bootstrap: str, topic: str, total: int) -> tuple[float, collections.Counter[str]]:
    """Consume, decode and count every record of *topic*; return (seconds, counts)."""
    parts = sorted(c.topic_size(bootstrap, topic))
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": c.unique("bench-plain"),
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
        }
    )
    counts: collections.Counter[str] = collections.Counter()
    loads = json.loads
    n = 0
    try:
        t0 = time.monotonic()
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        while n < total:
            msgs = consumer.consume(10_000, 1.0)
            counts.update(loads(m.value())["url"] for m in msgs if m.error() is None)
            n += len(msgs)
        seconds = time.monotonic() - t0
    finally:
        consumer.close()
    return seconds, counts


def fleet_run(
    app: str,
    workers: int,
    bootstrap: str,
    topic: str,
    total: int,
    interval: float,
    timeout: float,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run a fleet over the whole topic; time until completed batches cover every record."""
    out_topic = c.unique("bench-counts")
    win_topic = c.unique("bench-window")
    c.create_topic(bootstrap, out_topic, 1)
    c.create_topic(bootstrap, win_topic, 1)
    env = {
        "PAGEVIEWS_TOPIC": topic,
        "PAGEVIEWS_OUTPUT": out_topic,
        "PAGEVIEWS_WINDOW_OUTPUT": win_topic,
        "DSTREAM_BATCH_INTERVAL": str(interval),
        **(extra_env or {}),
    }
    t_launch = time.monotonic()
    with c.run_fleet(app, workers=workers, env=env, log_dir=c.RESULTS / "logs") as fleet:
        fleet.wait_ready()
        t_ready = time.monotonic()
        deadline = t_ready + timeout
        cpu0: dict[int, float] = {}
        while time.monotonic() < deadline:
            if fleet.proc.poll() is not None:
                msg = f"fleet exited early:\n{fleet.log_tail()}"
                raise RuntimeError(msg)
            if not cpu0:
                cpu0 = {p: c.cpu_seconds(p) for ps in fleet.roles().values() for p in ps}
            fleet.status()
            if fleet.processed() >= total:
                break
            time.sleep(0.05)
        t_done = time.monotonic()
        st = fleet.status() or {}
        roles = fleet.roles()
        cpu = {
            role: sum(c.cpu_seconds(p) - cpu0.get(p, 0.0) for p in pids)
            for role, pids in roles.items()
        }
        processed = fleet.processed()
        batches = sorted(fleet.seen.values(), key=lambda b: b["batch"])
    finals = _final_counts(bootstrap, out_topic)
    return {
        "processed": processed,
        "from_launch": t_done - t_launch,
        "from_ready": t_done - t_ready,
        "batches": batches,
        "finals": finals,
        "cpu": cpu,
        "stats": st.get("stats", {}),
        "timed_out": processed < total,
        "app_id": fleet.app_id,
    }


def _final_counts(bootstrap: str, topic: str) -> dict[str, int]:
    """Last running count per url on the output topic (read_committed, batch order)."""
    from tests.fleetkit import last_values, read_topic

    return {
        str(k): int(v) for k, v in last_values(read_topic(bootstrap, topic, idle_s=1.0)).items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--records", type=int, default=3_000_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--keys", type=int, default=1_000)
    p.add_argument("--interval", type=float, default=1.0, help="batch interval, seconds")
    p.add_argument("--timeout", type=float, default=300.0, help="per fleet variant, seconds")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--fragment", default="throughput.md")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    c.print_machine()
    bootstrap, _ = c.services()
    topic = f"bench-pageviews-{args.records}-{args.partitions}p-{args.keys}k"
    total = c.preload(bootstrap, topic, args.records, args.partitions, args.keys)

    results: dict[str, dict[str, Any]] = {}
    expected: collections.Counter[str] | None = None
    if "plain" in variants:
        seconds, expected = plain_loop(bootstrap, topic, total)
        results["plain"] = {"from_ready": seconds, "from_launch": seconds, "processed": total}
        print(f"plain loop: {total:,} records in {seconds:.2f} s = {total / seconds:,.0f}/s")
    apps = {
        "fleet-1w": ("examples/pageviews.py", 1),
        "fleet-2w": ("examples/pageviews.py", 2),
        "windowed-2w": ("examples/windowed_pageviews.py", 2),
        "fleet-2w-nometrics": ("examples/pageviews.py", 2),
    }
    envs = {"fleet-2w-nometrics": {"DSTREAM_METRICS": "false"}}
    for v in variants:
        if v == "plain-again" and expected is not None:
            # the plain loop once more at the end: the spread of the two is the run's noise
            seconds, again = plain_loop(bootstrap, topic, total)
            results["plain-again"] = {
                "from_ready": seconds,
                "from_launch": seconds,
                "processed": total,
                "exact": again == expected,
            }
            print(f"plain loop again: {seconds:.2f} s = {total / seconds:,.0f}/s", flush=True)
        if v not in apps:
            continue
        app, workers = apps[v]
        r = fleet_run(
            app, workers, bootstrap, topic, total, args.interval, args.timeout, envs.get(v)
        )
        exact = expected is None or r["finals"] == dict(expected)
        r["exact"] = exact
        results[v] = r
        print(
            f"{v}: {r['processed']:,} records; {r['from_ready']:.2f} s from ready "
            f"({total / r['from_ready']:,.0f}/s), {r['from_launch']:.2f} s from launch; "
            f"{len(r['batches'])} batches; counts exact: {exact}; cpu s {r['cpu']}",
            flush=True,
        )
    if "fleet-2w" in results:
        c.RESULTS.mkdir(parents=True, exist_ok=True)
        c.MAX_RATE_FILE.write_text(
            json.dumps(
                {
                    "rate": total / results["fleet-2w"]["from_ready"],
                    "when": time.strftime("%Y-%m-%d %H:%M"),
                    "records": total,
                }
            )
        )
    text = report(results, total, args)
    print(text)
    c.write_fragment(args.fragment, text)
    if not args.no_plot:
        plot(results, total)
    return 0


def report(results: dict[str, dict[str, Any]], total: int, args: argparse.Namespace) -> str:
    plains = [results[k]["from_ready"] for k in ("plain", "plain-again") if k in results]
    # the baseline is the mean of the plain runs (first and last of the run)
    base = total / (sum(plains) / len(plains)) if plains else float("nan")
    base_launch = base
    lines = [
        "## Throughput",
        "",
        f"Command: `.venv/bin/python -m bench.throughput --records {args.records} "
        f"--partitions {args.partitions} --keys {args.keys} --interval {args.interval}` "
        f"(batch interval {args.interval:g} s, `DSTREAM_BATCH_INTERVAL`; default task slots).",
        "",
        f"Input: {total:,} JSON page views pre-loaded into one topic, {args.partitions} "
        f"partitions, {args.keys} urls, uniform. All variants read the same topic on the same "
        "broker in this one run.",
        "",
        "| variant | records/s (from ready) | ratio to plain | from launch | ratio (launch) "
        "| batches | counts exact | CPU s coord / workers | target | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in results.items():
        rate = total / r["from_ready"] if r["from_ready"] else float("nan")
        rate_l = total / r["from_launch"] if r["from_launch"] else float("nan")
        ratio = rate / base
        ratio_l = rate_l / base_launch
        target = TARGETS.get(v)
        cpu = r.get("cpu")
        cpu_s = f"{cpu['coordinator']:.1f} / {cpu['worker']:.1f}" if cpu else "-"
        lines.append(
            f"| {v} | {rate:,.0f} | {ratio:.3f}x | {rate_l:,.0f}/s | {ratio_l:.3f}x "
            f"| {len(r.get('batches', [])) or '-'} | {r.get('exact', '-')} | {cpu_s} "
            f"| {f'>= {target}x' if target else '-'} "
            f"| {c.verdict(ratio, target, True) if target else '-'}"
            f"{' (timed out)' if r.get('timed_out') else ''} |"
        )
    if "fleet-2w" in results and "fleet-2w-nometrics" in results:
        on = total / results["fleet-2w"]["from_ready"]
        off = total / results["fleet-2w-nometrics"]["from_ready"]
        cost = 1 - on / off
        lines += [
            "",
            f"Cost of metrics: fleet-2w (metrics on) {on:,.0f}/s, fleet-2w-nometrics "
            f"(`DSTREAM_METRICS=false`) {off:,.0f}/s: {cost * 100:+.1f} % "
            f"(target at most {METRICS_COST_MAX * 100:.0f} %: "
            f"{'met' if cost <= METRICS_COST_MAX else 'missed'}).",
        ]
    lines += [
        "",
        "Ratios are to the mean of the two plain-loop runs (first and last variant of the "
        "run); their spread shows the run's noise.",
        "",
        "Fleet time = until completed batches (every output committed, per the coordinator's "
        "`/api/status`) add up to the topic size; the plain loop is timed from `assign()` "
        "to its last record. CPU seconds are those of the fleet processes during the run "
        "(the machine has "
        f"{c.machine()['cores']} cores shared with the broker).",
        "",
        "![throughput](throughput.png)",
        "",
    ]
    for v, r in results.items():
        bs = r.get("batches") or []
        if bs:
            proc = [b["processing_time"] for b in bs if b.get("processing_time") is not None]
            recs = [b["records"] for b in bs]
            lines.append(
                f"- {v}: median batch {c.median(recs):,.0f} records, median processing time "
                f"{c.median(proc):.2f} s, max total delay "
                f"{max((b.get('total_delay') or 0) for b in bs):.1f} s "
                f"(batches pile up: the receivers read ahead of the tasks)."
            )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], total: int) -> None:
    plt = c.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results)
    rates = [total / results[v]["from_ready"] for v in names]
    bars = ax[0].bar(names, rates, color=["grey", "C0", "C1", "C2", "silver"][: len(names)])
    for b, r in zip(bars, rates, strict=True):
        ax[0].text(b.get_x() + b.get_width() / 2, r, f"{r / rates[0]:.2f}x", ha="center")
    ax[0].set_ylabel("records/s")
    ax[0].set_title("Throughput (ratio to the plain loop)")
    for v in names:
        bs = results[v].get("batches") or []
        if not bs:
            continue
        t0 = bs[0]["time_ms"]
        xs = [(b["time_ms"] - t0) / 1000 for b in bs]
        acc, ys = 0, []
        for b in bs:
            acc += b["records"]
            ys.append(acc)
        ax[1].plot(xs, ys, label=v)
    ax[1].axhline(total, color="grey", ls=":")
    ax[1].set_xlabel("batch time since first batch (s)")
    ax[1].set_ylabel("records in completed batches")
    ax[1].legend()
    fig.tight_layout()
    out = c.RESULTS / "throughput.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out.relative_to(c.ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
