"""A straggler: batch processing time with a 5x-slow worker, with and without speculation.

Three variants, each on a fresh 4-partition input topic with a fresh 3-worker fleet of
``examples/pageviews.py`` (running count per url, ``to_kafka``), 1 s batches, fed by
``ops.tools.produce.produce_pageviews`` in a thread of this process at ``--rate`` (default 20% of
the fleet's measured maximum, :func:`bench._common.max_rate`):

* ``none``: no fault;
* ``slow, no speculation``: ``DSTREAM_FAULT_SLOW=5`` (one worker, the first to claim it in
  ``DSTREAM_FAULT_DIR``, runs every task 5x slower) and ``DSTREAM_SPECULATION=false``;
* ``slow, speculation``: ``DSTREAM_FAULT_SLOW=5``, speculation on (default: a copy of a task
  running longer than 1.4x its stage's median once 75% of the stage finished).

Figure: median ``processing_time`` (first task launched to batch done, coordinator
``/api/status``) of the batches sealed after ``--warmup`` s of input until the input ends;
ratio to the ``none`` variant. Speculative copies launched/won from the status ``stats``.
Per worker and stage, task count and mean task time from each worker's ``/metrics``
(``dstream_task_duration_seconds``): where the time goes. Target: with speculation within
1.3x of ``none`` (the D-Streams paper: 1.8x on WordCount).

    .venv/bin/python -m bench.straggler [--rate 50000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

from bench import _common as c

TARGET = 1.3
APP = "examples/pageviews.py"
#: key -> (label, environment)
VARIANTS = {
    "none": ("none", {}),
    "slow": (
        "slow, no speculation",
        {"DSTREAM_FAULT_SLOW": "5", "DSTREAM_SPECULATION": "false"},
    ),
    "spec": ("slow, speculation", {"DSTREAM_FAULT_SLOW": "5"}),
}
_METRIC = re.compile(
    r'^dstream_task_duration_seconds_(sum|count)\{stage="([^"]*)"\} ([0-9.eE+-]+)$', re.M
)


def task_metrics(port: int) -> dict[str, tuple[float, float]]:
    """stage -> (task count, seconds) of one worker's ``/metrics``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, list[float]] = {}
    for kind, stage, value in _METRIC.findall(text):
        out.setdefault(stage, [0.0, 0.0])[0 if kind == "count" else 1] = float(value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def one_run(name: str, fault_env: dict[str, str], rate: float, args: argparse.Namespace) -> dict:
    from ops.tools.produce import produce_pageviews

    bootstrap, _ = c.services()
    inp, out = c.unique("bench-strag-in"), c.unique("bench-strag-out")
    c.create_topic(bootstrap, inp, args.partitions)
    c.create_topic(bootstrap, out, 2)
    fault_dir = tempfile.mkdtemp(prefix="bench-straggler-")
    env = {
        "PAGEVIEWS_TOPIC": inp,
        "PAGEVIEWS_OUTPUT": out,
        "DSTREAM_BATCH_INTERVAL": str(args.interval),
        "DSTREAM_FAULT_DIR": fault_dir,
        **fault_env,
    }
    duration = args.warmup + args.seconds
    print(f"\n--- {name}: {rate:,.0f} records/s for {duration:g} s", flush=True)
    with c.run_fleet(APP, workers=args.workers, env=env, log_dir=c.RESULTS / "logs") as f:
        f.wait_ready()
        feeder = threading.Thread(
            target=produce_pageviews,
            args=(bootstrap, inp),
            kwargs={"rate": rate, "duration": duration, "keys": args.keys, "seed": 5},
            daemon=True,
        )
        t0 = time.time()
        feeder.start()
        while feeder.is_alive():
            f.status()
            time.sleep(0.5)
        t_end = time.time()
        lo, hi = t0 + args.warmup, t_end
        deadline = time.monotonic() + args.catch_up
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = f.status() or st
            want = [b for b in f.seen.values() if lo <= b["time_ms"] / 1000 <= hi]
            if want and all(b["total_delay"] is not None for b in want):
                break
            time.sleep(0.5)
        st = f.status() or st
        per_worker = {
            w["id"]: task_metrics(w["http_port"]) for w in st.get("workers", []) if w["http_port"]
        }
        slow_pid = ""
        if "DSTREAM_FAULT_SLOW" in fault_env:
            try:
                with open(f"{fault_dir}/slow") as fh:
                    slow_pid = fh.read().strip()
            except OSError:
                slow_pid = "?"
    measured = [
        b
        for b in f.seen.values()
        if lo <= b["time_ms"] / 1000 <= hi and b["processing_time"] is not None
    ]
    proc = [b["processing_time"] for b in measured]
    res = {
        "name": name,
        "batches": len(measured),
        "median": c.median(proc),
        "p90": c.pct(proc, 0.9),
        "total_median": c.median([b["total_delay"] for b in measured]),
        "records": c.median([b["records"] for b in measured]),
        "stats": st.get("stats", {}),
        "per_worker": per_worker,
        "slow_pid": slow_pid,
        "pending_end": len(st.get("pending", [])),
    }
    print(
        f"{name}: {len(measured)} batches, median processing {res['median']:.3f}s "
        f"(p90 {res['p90']:.3f}s), median total delay {res['total_median']:.3f}s, "
        f"speculative launched {res['stats'].get('speculative_launched')} won "
        f"{res['stats'].get('speculative_won')}",
        flush=True,
    )
    for wid, stages in per_worker.items():
        print(
            f"  worker {wid}: "
            + ", ".join(
                f"{s} {n:.0f} tasks {t / n * 1000 if n else 0:.0f} ms"
                for s, (n, t) in sorted(stages.items())
            ),
            flush=True,
        )
    return res


def report(runs: list[dict[str, Any]], rate: float, source: str, args: argparse.Namespace) -> str:
    base = runs[0]["median"]
    cmd = f".venv/bin/python -m bench.straggler --seconds {args.seconds:g}"
    if args.rate:
        cmd += f" --rate {args.rate:g}"
    lines = [
        "## Straggler (one 5x-slow worker) and speculation",
        "",
        f"Command: `{cmd}`",
        "",
        f"Fleet: `{APP}`, {args.workers} workers, {args.interval:g} s batches, "
        f"{args.partitions} input partitions, {args.keys} urls; input "
        f"`ops.tools.produce.produce_pageviews` in a thread of the bench at {rate:,.0f} records/s "
        f"({source}); batches sealed from {args.warmup:g} s after the input starts to its end "
        f"({args.seconds:g} s). Slow worker: `DSTREAM_FAULT_SLOW=5` (one worker sleeps 4x its "
        "compute time + 0.1 s after every task); speculation: default 1.4x the stage median "
        "once 75% of the stage finished. Processing time = first task launched to batch done "
        "(coordinator `/api/status`).",
        "",
        "| variant | batches | records/batch | median processing | p90 processing "
        "| ratio to none | median total delay | speculative launched / won |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r["stats"]
        lines.append(
            f"| {r['name']} | {r['batches']} | {r['records']:,.0f} | {r['median'] * 1000:.0f} ms "
            f"| {r['p90'] * 1000:.0f} ms | {r['median'] / base:.2f}x "
            f"| {r['total_median'] * 1000:.0f} ms "
            f"| {s.get('speculative_launched', 0)} / {s.get('speculative_won', 0)} |"
        )
    spec = next(r for r in runs if r["name"] == "slow, speculation")
    ratio = spec["median"] / base
    lines += [
        "",
        f"Target: with speculation within {TARGET}x of no straggler: {ratio:.2f}x, "
        f"**{c.verdict(ratio, TARGET, False)}**.",
        "",
        "Where the time goes (per worker: tasks and mean task time by stage, from each "
        "worker's `dstream_task_duration_seconds`, whole run incl. warm-up):",
        "",
    ]
    for r in runs:
        lines.append(f"- {r['name']}:")
        for wid, stages in r["per_worker"].items():
            lines.append(
                f"  - `{wid}`: "
                + ", ".join(
                    f"{st} {n:.0f} x {t / n * 1000 if n else 0:.0f} ms"
                    for st, (n, t) in sorted(stages.items())
                )
            )
    lines += ["", "![straggler](straggler.png)", ""]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]]) -> None:
    plt = c.plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = [r["name"] for r in runs]
    med = [r["median"] for r in runs]
    bars = ax.bar(names, med, color=["tab:green", "tab:red", "tab:blue"][: len(runs)])
    for b, r in zip(bars, runs, strict=True):
        ax.annotate(
            f"{r['median'] / runs[0]['median']:.2f}x",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
        )
    ax.axhline(TARGET * runs[0]["median"], color="grey", ls=":", label=f"target {TARGET}x")
    ax.set_ylabel("median batch processing time (s)")
    ax.legend()
    fig.tight_layout()
    out = c.RESULTS / "straggler.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out.relative_to(c.ROOT)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    c.add_load_args(p)
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds of input")
    p.add_argument("--catch-up", type=float, default=60.0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="of none,slow,spec")
    p.add_argument("--fragment", default="straggler.md")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    c.print_machine()
    rate, source = c.run_rate(args.rate, args.level, args.max_rate)
    keys = [v for v in VARIANTS if v in args.variants.split(",")]
    runs = [one_run(*VARIANTS[k], rate, args) for k in keys]
    if runs[0]["name"] != "none" or not any(r["name"] == "slow, speculation" for r in runs):
        return 0  # partial run: no ratios to report
    text = report(runs, rate, source, args)
    print(text)
    c.write_fragment(args.fragment, text)
    if not args.no_plot:
        plot(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
