"""Memory soak: worker RSS and block-store bytes over N minutes at a steady input rate.

A 2-worker fleet of ``examples/windowed_pageviews.py`` (running count plus a 10 s / 1 s
window: the state and the window retention both live in the block store) on a fresh topic,
fed by ``dstream produce --rate R`` for ``--minutes``; every ``--every`` seconds the RSS of
each worker process (``/proc/<pid>/status`` VmRSS; the workers are the children of the
``dstream run`` process) and each worker's block-store bytes (coordinator ``/api/status``,
``workers[].store_bytes``, from the heartbeats) are sampled.

Growth = (mean of the last minute - the sample at 1 minute) / the sample at 1 minute, per
worker; the figure is the largest. Target: <= 10%.

    .venv/bin/python -m bench.soak [--minutes 10] [--rate 5000]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bench import _common as c

TARGET = 0.10


def growth(samples: list[tuple[float, float]], minutes: float) -> float:
    """Relative growth of the last minute's mean over the value at 1 minute."""
    base = next((v for t, v in samples if t >= 60), None)
    tail = [v for t, v in samples if t >= minutes * 60 - 60]
    if not base or not tail:
        return float("nan")
    return (sum(tail) / len(tail) - base) / base


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, help="records/s (default: 20%% of the max rate)")
    p.add_argument("--max-rate", type=float)
    p.add_argument("--interval", type=float, default=1.0, help="batch interval, seconds")
    p.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--fragment", default="soak.md")
    args = p.parse_args(argv)
    c.print_machine()
    rate, source = c.run_rate(args.rate, 0.2, args.max_rate)
    bootstrap, _ = c.services()
    inp, out, win = c.unique("bench-soak-in"), c.unique("bench-soak-out"), c.unique("bench-soak-w")
    for t, n in ((inp, 4), (out, 1), (win, 1)):
        c.create_topic(bootstrap, t, n)
    env = {
        "PAGEVIEWS_TOPIC": inp,
        "PAGEVIEWS_OUTPUT": out,
        "PAGEVIEWS_WINDOW_OUTPUT": win,
        "DSTREAM_BATCH_INTERVAL": str(args.interval),
    }
    duration = args.minutes * 60
    rss: dict[int, list[tuple[float, float]]] = {}
    store: dict[str, list[tuple[float, float]]] = {}
    pending: list[tuple[float, int]] = []
    print(f"soak: {args.minutes:g} min at {rate:,.0f} records/s ({source})", flush=True)
    app = "examples/windowed_pageviews.py"
    with c.run_fleet(app, workers=2, env=env, log_dir=c.RESULTS / "logs") as f:
        f.wait_ready()
        workers = f.roles()["worker"]
        t0 = time.monotonic()
        with c.producer(inp, rate, duration + 5) as prod:
            next_print = 0.0
            while (now := time.monotonic() - t0) < duration:
                if prod.poll() is not None or f.proc.poll() is not None:
                    msg = f"producer or fleet exited early:\n{f.log_tail()}"
                    raise RuntimeError(msg)
                for pid in workers:
                    rss.setdefault(pid, []).append((now, c.rss_bytes(pid) / 2**20))
                st = f.status() or {}
                for w in st.get("workers", []):
                    store.setdefault(w["id"], []).append((now, w["store_bytes"] / 2**20))
                pending.append((now, len(st.get("pending", []))))
                if now >= next_print:
                    print(
                        f"t={now:5.0f}s rss MiB "
                        + " ".join(f"{v[-1][1]:.0f}" for v in rss.values())
                        + " store MiB "
                        + " ".join(f"{v[-1][1]:.1f}" for v in store.values())
                        + f" pending {pending[-1][1]}",
                        flush=True,
                    )
                    next_print = now + 30
                time.sleep(args.every)
    rss_growth = {pid: growth(s, args.minutes) for pid, s in rss.items()}
    store_growth = {w: growth(s, args.minutes) for w, s in store.items()}
    worst = max(rss_growth.values(), default=float("nan"))
    lines = [
        "## Memory soak",
        "",
        f"Command: `.venv/bin/python -m bench.soak --minutes {args.minutes:g}"
        f"{f' --rate {args.rate:g}' if args.rate else ''}`",
        "",
        f"{args.minutes:g} minutes at {rate:,.0f} records/s ({source}), 2 workers, "
        f"`{app}` (running count + 10 s / 1 s window), {args.interval:g} s batches, "
        f"samples every {args.every:g} s. Growth = mean of the last minute vs the sample at "
        "1 minute.",
        "",
        "| worker | RSS at 1 min | RSS last minute (mean) | RSS growth | store at 1 min "
        "| store last minute | store growth |",
        "|---|---|---|---|---|---|---|",
    ]
    store_list = list(store.items())
    for i, (pid, s) in enumerate(rss.items()):
        base = next((v for t, v in s if t >= 60), float("nan"))
        tail = [v for t, v in s if t >= duration - 60]
        sw = store_list[i] if i < len(store_list) else None
        sb = next((v for t, v in sw[1] if t >= 60), float("nan")) if sw else float("nan")
        stail = [v for t, v in sw[1] if t >= duration - 60] if sw else []
        lines.append(
            f"| worker {i + 1} (pid {pid}) | {base:.0f} MiB | {sum(tail) / max(1, len(tail)):.0f} "
            f"MiB | {rss_growth[pid] * 100:+.1f}% | {sb:.1f} MiB "
            f"| {sum(stail) / max(1, len(stail)):.1f} MiB "
            f"| {store_growth[sw[0]] * 100 if sw else float('nan'):+.1f}% |"
        )
    lines += [
        "",
        f"Worst worker RSS growth after the first minute: {worst * 100:+.1f}% (target <= "
        f"{TARGET * 100:.0f}%): **{c.verdict(worst, TARGET, False) if worst > 0 else 'met'}**. "
        f"Pending batches: max {max((n for _, n in pending), default=0)}.",
        "",
        "![soak](soak.png)",
        "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    c.write_fragment(args.fragment, text)
    plot(rss, store)
    return 0


def plot(rss: dict[int, list[tuple[float, float]]], store: dict[str, Any]) -> None:
    plt = c.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for i, s in enumerate(rss.values()):
        ax[0].plot([t / 60 for t, _ in s], [v for _, v in s], label=f"worker {i + 1}")
    ax[0].axvline(1, color="grey", ls=":")
    ax[0].set_xlabel("minutes")
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].set_ylim(bottom=0)
    ax[0].legend()
    for i, s in enumerate(store.values()):
        ax[1].plot([t / 60 for t, _ in s], [v for _, v in s], label=f"worker {i + 1}")
    ax[1].set_xlabel("minutes")
    ax[1].set_ylabel("block store (MiB)")
    ax[1].set_ylim(bottom=0)
    ax[1].legend()
    fig.tight_layout()
    out = c.RESULTS / "soak.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out.relative_to(c.ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
