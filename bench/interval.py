"""The smallest stable batch interval at 10% of the fleet's maximum rate.

For each interval (``--intervals``, default 1 s, 500, 200, 100 ms): a fresh 2-worker fleet of
``examples/pageviews.py`` and input topic, ``dstream produce`` at ``--level`` (default 10%) of
the measured maximum for ``--duration`` seconds, the coordinator's ``/api/status`` polled.

Stable means the fleet keeps up: over the batches after the first ``--warmup`` seconds,
the median processing time is within the interval, the 95th percentile of the total delay
(seal to last commit) is within 2 intervals + 100 ms, and the number of pending batches at
the end of the input is at most 3 (it does not grow).

    .venv/bin/python -m bench.interval [--intervals 1.0,0.5,0.2,0.1] [--duration 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bench import _common as c

TARGET_S = 0.1


def one_run(interval: float, rate: float, duration: float, warmup: float) -> dict[str, Any]:
    bootstrap, _ = c.services()
    inp, out = c.unique("bench-iv-in"), c.unique("bench-iv-out")
    c.create_topic(bootstrap, inp, 4)
    c.create_topic(bootstrap, out, 1)
    env = {"PAGEVIEWS_TOPIC": inp, "PAGEVIEWS_OUTPUT": out, "DSTREAM_BATCH_INTERVAL": str(interval)}
    pending: list[tuple[float, int]] = []
    with c.run_fleet("examples/pageviews.py", workers=2, env=env, log_dir=c.RESULTS / "logs") as f:
        f.wait_ready()
        t0 = time.monotonic()
        with c.producer(inp, rate, duration) as prod:
            while prod.poll() is None and time.monotonic() - t0 < duration + 30:
                st = f.status()
                if st is not None:
                    pending.append((time.monotonic() - t0, len(st.get("pending", []))))
                time.sleep(min(0.1, interval / 2))
        st = f.status() or {}
        end_pending = len(st.get("pending", []))
        t_end = time.monotonic() - t0
    wall0 = min((b["time_ms"] for b in f.seen.values()), default=0)
    steady = [
        b
        for b in f.seen.values()
        if b["time_ms"] - wall0 >= warmup * 1000 and b.get("total_delay") is not None
    ]
    proc = [b["processing_time"] for b in steady if b.get("processing_time") is not None]
    total = [b["total_delay"] for b in steady]
    med_proc = c.median(proc)
    p95_total = c.pct(total, 0.95)
    stable = bool(
        steady and med_proc <= interval and p95_total <= 2 * interval + 0.1 and end_pending <= 3
    )
    return {
        "interval": interval,
        "rate": rate,
        "batches": len(steady),
        "median_processing": med_proc,
        "p95_total_delay": p95_total,
        "max_pending": max((n for _, n in pending), default=0),
        "end_pending": end_pending,
        "stable": stable,
        "pending": pending,
        "t_end": t_end,
        "records_per_batch": c.median([b["records"] for b in steady]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--intervals", default="1.0,0.5,0.2,0.1")
    p.add_argument("--level", type=float, default=0.1, help="fraction of the max rate")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--max-rate", type=float)
    p.add_argument("--fragment", default="interval.md")
    args = p.parse_args(argv)
    c.print_machine()
    mx, source = c.max_rate(args.max_rate)
    rate = round(mx * args.level)
    print(f"rate {rate:,}/s = {args.level:.0%} of {mx:,.0f}/s ({source})", flush=True)
    runs = []
    for iv in [float(x) for x in args.intervals.split(",") if x]:
        r = one_run(iv, rate, args.duration, args.warmup)
        runs.append(r)
        print(
            f"interval {iv * 1000:.0f} ms: {r['batches']} batches, median processing "
            f"{r['median_processing'] * 1000:.0f} ms, p95 total delay "
            f"{r['p95_total_delay'] * 1000:.0f} ms, pending max {r['max_pending']} / end "
            f"{r['end_pending']}: {'stable' if r['stable'] else 'NOT stable'}",
            flush=True,
        )
    stable = [r["interval"] for r in runs if r["stable"]]
    smallest = min(stable) if stable else float("nan")
    lines = [
        "## Smallest stable batch interval",
        "",
        f"Command: `.venv/bin/python -m bench.interval --intervals {args.intervals} "
        f"--level {args.level} --duration {args.duration:g}`",
        "",
        f"Rate {rate:,} records/s ({args.level:.0%} of {mx:,.0f}/s, {source}); 2 workers, "
        f"`examples/pageviews.py`, {args.duration:g} s of input per interval, first "
        f"{args.warmup:g} s left out. Stable = median processing time <= interval, p95 total "
        "delay <= 2 intervals + 100 ms, <= 3 batches pending at the end.",
        "",
        "| interval | batches | records/batch | median processing | p95 total delay "
        "| pending max / end | stable |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['interval'] * 1000:.0f} ms | {r['batches']} | {r['records_per_batch']:,.0f} "
            f"| {r['median_processing'] * 1000:.0f} ms | {r['p95_total_delay'] * 1000:.0f} ms "
            f"| {r['max_pending']} / {r['end_pending']} | {'yes' if r['stable'] else 'no'} |"
        )
    verdict = (
        "met"
        if smallest == smallest and smallest <= TARGET_S
        else (
            f"missed: smallest stable is {smallest * 1000:.0f} ms"
            if smallest == smallest
            else "missed: no interval was stable"
        )
    )
    lines += [
        "",
        f"Smallest stable interval: "
        f"{f'{smallest * 1000:.0f} ms' if smallest == smallest else 'none'}; target "
        f"{TARGET_S * 1000:.0f} ms: **{verdict}**.",
        "",
        "![pending batches](interval.png)",
        "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    c.write_fragment(args.fragment, text)
    plt = c.plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in runs:
        ax.plot(
            [t for t, _ in r["pending"]],
            [n for _, n in r["pending"]],
            label=f"{r['interval'] * 1000:.0f} ms",
        )
    ax.set_xlabel("seconds since the input started")
    ax.set_ylabel("pending batches")
    ax.set_title(f"Pending batches at {rate:,} records/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(c.RESULTS / "interval.png", dpi=90)
    return 0


if __name__ == "__main__":
    sys.exit(main())
