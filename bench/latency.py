"""End-to-end latency of the page-view fleet at fixed input rates.

For each batch interval (``--intervals``, default 0.5 and 1 s) and each rate (``--levels``,
default 10%, 50% and 80% of the fleet's measured maximum, see :func:`bench._common.max_rate`):

1. a fresh input topic (4 partitions) and output topic, and a fresh 2-worker fleet of
   ``examples/pageviews.py`` (running count per url, ``to_kafka``);
2. ``dstream produce --rate R --duration D --procs P`` in a child process; each event
   carries ``ts`` (wall-clock ms when handed to the producer) and ``seq`` (per-url sequence
   number, from 0, in order: one url is one partition, one url is sent by one of the P
   producer processes and each producer is idempotent). P is 1 up to ``ONE_PROC_RATE``
   records/s (what one producer process holds here with the cores busy), else 2;
   ``--producer-procs`` overrides it;
3. a ``read_committed`` consumer of the output in this process stamps every output message
   with its receive time.

Per event ``(url, seq, ts)``: its result is the first output message of that url whose
running count is ``>= seq + 1`` (the first committed count that includes it); its latency is
that message's receive time minus ``ts``. Events of the first ``--warmup`` seconds are left
out. p50/p95/p99 per (interval, rate), and a CDF plot.

    .venv/bin/python -m bench.latency [--duration 20] [--intervals 0.5,1.0] [--levels 0.1,0.5,0.8]
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import threading
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench import _common as c

TARGET = {"interval": 0.5, "level": 0.5, "p50": 0.8, "p99": 1.5}

#: Highest rate one ``dstream produce`` process is asked for; above it the rate is split
#: over 2 processes. One process alone holds 300k records/s of these events here (2 cores),
#: and 250k/s with both cores kept busy by two other processes.
ONE_PROC_RATE = 250_000


def producer_procs(rate: float, explicit: int | None = None) -> int:
    """Producer processes for *rate*: *explicit* if given, else 1 up to ONE_PROC_RATE, else 2."""
    if explicit:
        return explicit
    return 1 if rate <= ONE_PROC_RATE else 2


class OutputWatcher(threading.Thread):
    """Reads an output topic read_committed; records (url, count, receive wall time s)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True, name="output-watcher")
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": c.unique("bench-latency"),
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 10,
                "fetch.min.bytes": 1,
            }
        )
        self.consumer.assign([TopicPartition(topic, 0, 0)])
        self.rows: list[tuple[bytes, bytes, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                msgs = self.consumer.consume(10_000, 0.02)
                now = time.time()
                self.rows.extend((m.key(), m.value(), now) for m in msgs if m.error() is None)
        finally:
            self.consumer.close()

    def latest(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, v, _ in list(self.rows):
            out[json.loads(k)] = int(json.loads(v))
        return out


def read_events(bootstrap: str, topic: str) -> list[tuple[str, int, int]]:
    """(url, seq, ts ms) of every input event."""
    from tests.fleetkit import read_topic

    out = []
    for m in read_topic(bootstrap, topic, idle_s=1.0):
        e = json.loads(m.value())
        out.append((e["url"], e["seq"], e["ts"]))
    return out


def latencies(
    events: list[tuple[str, int, int]], rows: list[tuple[bytes, bytes, float]], skip_before: float
) -> tuple[list[float], int]:
    """Per-event latency (s); also how many events never showed up in the output."""
    per_url: dict[str, tuple[list[int], list[float]]] = {}
    for k, v, t in rows:
        counts, times = per_url.setdefault(json.loads(k), ([], []))
        n = int(json.loads(v))
        if counts and n <= counts[-1]:
            continue  # counts only grow; keep the first message reaching each count
        counts.append(n)
        times.append(t)
    out: list[float] = []
    missing = 0
    for url, seq, ts in events:
        if ts / 1000 < skip_before:
            continue
        counts, times = per_url.get(url, ([], []))
        i = bisect.bisect_left(counts, seq + 1)
        if i == len(counts):
            missing += 1
            continue
        out.append(times[i] - ts / 1000)
    return out, missing


def one_run(
    rate: float, interval: float, duration: float, warmup: float, procs: int = 1
) -> dict[str, Any]:
    bootstrap, _ = c.services()
    inp, out = c.unique("bench-lat-in"), c.unique("bench-lat-out")
    c.create_topic(bootstrap, inp, 4)
    c.create_topic(bootstrap, out, 1)
    env = {
        "PAGEVIEWS_TOPIC": inp,
        "PAGEVIEWS_OUTPUT": out,
        "DSTREAM_BATCH_INTERVAL": str(interval),
    }
    watcher = OutputWatcher(bootstrap, out)
    watcher.start()
    delays: list[float] = []
    with c.run_fleet("examples/pageviews.py", workers=2, env=env, log_dir=c.RESULTS / "logs") as f:
        f.wait_ready()
        time.sleep(2 * interval)  # let the first (empty) batches pass
        t_start = time.time()
        with c.producer(inp, rate, duration, procs=procs) as prod:
            prod.wait(duration + 60)
            produced = (prod.stdout.read() if prod.stdout else b"").decode(errors="replace")
        events = read_events(bootstrap, inp)
        expected: dict[str, int] = {}
        for url, seq, _ in events:
            expected[url] = max(expected.get(url, 0), seq + 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and watcher.latest() != expected:
            f.status()
            time.sleep(0.2)
        f.status()
        delays = [b["total_delay"] for b in f.seen.values() if b.get("total_delay") is not None]
    watcher.stop.set()
    watcher.join(5)
    lat, missing = latencies(events, watcher.rows, t_start + warmup)
    return {
        "rate": rate,
        "procs": procs,
        "interval": interval,
        "events": len(events),
        "achieved": len(events) / duration,
        "measured": len(lat),
        "missing": missing,
        "p50": c.pct(lat, 0.5),
        "p95": c.pct(lat, 0.95),
        "p99": c.pct(lat, 0.99),
        "max": max(lat) if lat else float("nan"),
        "lat": lat,
        "batch_delay_p50": c.pct(delays, 0.5),
        "producer": produced.strip().splitlines()[-1:] if produced else [],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of input per run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of input left out")
    p.add_argument("--intervals", default="0.5,1.0")
    p.add_argument("--levels", default="0.1,0.5,0.8", help="fractions of the max rate")
    p.add_argument("--max-rate", type=float, help="records/s (default: throughput's figure)")
    p.add_argument(
        "--producer-procs",
        type=int,
        help=f"dstream produce --procs (default: 1 up to {ONE_PROC_RATE:,} records/s, else 2)",
    )
    p.add_argument("--fragment", default="latency.md")
    args = p.parse_args(argv)
    c.print_machine()
    mx, source = c.max_rate(args.max_rate)
    print(f"max rate {mx:,.0f} records/s ({source})", flush=True)
    runs = []
    for iv in [float(x) for x in args.intervals.split(",") if x]:
        for lv in [float(x) for x in args.levels.split(",") if x]:
            rate = round(mx * lv)
            r = one_run(
                rate, iv, args.duration, args.warmup, producer_procs(rate, args.producer_procs)
            )
            r["level"] = lv
            runs.append(r)
            print(
                f"interval {iv:g} s, {lv:.0%} of max ({r['rate']:,}/s, achieved "
                f"{r['achieved']:,.0f}/s, {r['procs']} producer procs): "
                f"p50 {r['p50']:.3f} s p95 {r['p95']:.3f} s "
                f"p99 {r['p99']:.3f} s max {r['max']:.3f} s over {r['measured']:,} events "
                f"({r['missing']} missing)",
                flush=True,
            )
    text = report(runs, mx, source, args)
    print(text)
    c.write_fragment(args.fragment, text)
    plot(runs)
    return 0


def report(runs: list[dict[str, Any]], mx: float, source: str, args: argparse.Namespace) -> str:
    lines = [
        "## End-to-end latency",
        "",
        f"Command: `.venv/bin/python -m bench.latency --duration {args.duration:g} "
        f"--intervals {args.intervals} --levels {args.levels}"
        + (f" --producer-procs {args.producer_procs}" if args.producer_procs else "")
        + "`",
        "",
        f"Max rate: {mx:,.0f} records/s ({source}). Fleet: `examples/pageviews.py`, 2 "
        f"workers; input: `dstream produce --procs P` (a child process) into a fresh "
        f"4-partition topic for {args.duration:g} s; P producer processes split the urls "
        f"(and so the rate) between them: P = "
        + (
            f"{args.producer_procs} (--producer-procs)"
            if args.producer_procs
            else f"1 up to {ONE_PROC_RATE:,} records/s, else 2"
        )
        + f". First {args.warmup:g} s of events left out. Latency = "
        "receive time, by a `read_committed` consumer, of the first output message whose "
        "running count includes the event (per-url `seq`) minus the event's `ts`. The "
        "producer shares the 2 cores with the fleet and the broker.",
        "",
        "| interval | rate (of max) | producer procs | achieved | events | p50 | p95 | p99 "
        "| max | batch total delay p50 | missing |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['interval'] * 1000:.0f} ms | {r['rate']:,}/s ({r['level']:.0%}) "
            f"| {r['procs']} | {r['achieved']:,.0f}/s | {r['measured']:,} | {r['p50']:.3f} s "
            f"| {r['p95']:.3f} s | {r['p99']:.3f} s | {r['max']:.3f} s "
            f"| {r['batch_delay_p50']:.3f} s | {r['missing']} |"
        )
    t = next(
        (r for r in runs if r["interval"] == TARGET["interval"] and r["level"] == TARGET["level"]),
        None,
    )
    if t:
        lines += [
            "",
            f"Target (50% of max, 500 ms batches): p50 <= {TARGET['p50']} s: "
            f"{t['p50']:.3f} s, **{c.verdict(t['p50'], TARGET['p50'], False)}**; "
            f"p99 <= {TARGET['p99']} s: {t['p99']:.3f} s, "
            f"**{c.verdict(t['p99'], TARGET['p99'], False)}**.",
        ]
    lines += ["", "![latency CDF](latency_cdf.png)", ""]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]]) -> None:
    plt = c.plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        lat = sorted(r["lat"])
        if not lat:
            continue
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        ls = "-" if r["interval"] < 1 else "--"
        ax.plot(
            lat,
            ys,
            ls,
            label=f"{r['interval'] * 1000:.0f} ms, {r['level']:.0%} ({r['rate']:,}/s)",
        )
    ax.axvline(TARGET["p50"], color="grey", ls=":", lw=1)
    ax.axvline(TARGET["p99"], color="red", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (s, log)")
    ax.set_ylabel("fraction of events")
    ax.set_title("Latency CDF (dotted: p50 and p99 targets)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = c.RESULTS / "latency_cdf.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out.relative_to(c.ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
