"""Coordinator memory at scale: the simulated fleet of ``bench.scale`` for N minutes of batches.

The real :class:`engine.plan.Plan` and :class:`engine.scheduler.Scheduler` run the
page-view job for 1,000 simulated workers (4 input partitions each), batch after batch, with
the coordinator's defaults (inputs retained 22 batches, state checkpointed every 10).
Simulated time: the batches run back to back and the scheduler's clock advances 1 s per
batch, so "10 minutes" is 600 batches of 1 s; the scheduler's bookkeeping (tasks, blocks,
lineage, finished batches) is the same as with 1 s batches in real time, only the wall time
differs (each batch takes the coordinator's CPU time for it).

Figures: the process' RSS and Python's allocated memory blocks (``sys.getallocatedblocks``)
sampled every ``--sample-every`` batches, their growth from the end of warm-up (the first
simulated minute) to the end, and the sizes of the scheduler's collections at both points.

``--malloc-trim`` calls glibc's ``malloc_trim(0)`` every 10 batches (10 simulated
seconds), as the worker does every 10 s: it tells heap growth (freed memory glibc keeps)
from live objects (the allocated blocks).

    .venv/bin/python -m bench.scale_memory [--workers 1000] [--minutes 10] [--malloc-trim]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

from bench import _common as c
from bench.scale import SimCoordinator
from engine.scheduler import Scheduler, tune_gc

TARGET_GROWTH = 0.10


def _rss() -> int:
    import os

    return c.rss_bytes(os.getpid())


def collections_of(s: Scheduler) -> dict[str, int]:
    """Sizes of the scheduler's collections that grow with what it keeps."""
    return {
        "tasks": len(s.tasks),
        "batches": len(s.batches),
        "lineage": len(s.lineage),
        "locations": len(s.locations),
        "sizes": len(s.sizes),
        "completed": len(s.completed),
        "queue": len(s._queue),
        "stages": len(s._stages),
        "splits": len(s._splits),
        "avail": len(s._avail),
    }


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None where there is none)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def run(workers: int, minutes: float, sample_every: int, trim: bool = False) -> dict[str, Any]:
    trim_fn = _malloc_trim() if trim else None
    sim = SimCoordinator(workers, 1)
    tune_gc()
    batches = round(minutes * 60)
    warm = min(60, batches // 2)
    samples: list[tuple[int, int, int]] = []  # (batch, rss, allocated blocks)
    at_warm: dict[str, int] = {}
    t0 = time.monotonic()
    for b in range(batches):
        sim.run_batch(b)
        sim.checkpoint(b)
        sim.clock += 1.0
        if trim_fn is not None and (b + 1) % 10 == 0:
            trim_fn(0)
        if (b + 1) % sample_every == 0 or b + 1 in (warm, batches):
            gc.collect()
            samples.append((b + 1, _rss(), sys.getallocatedblocks()))
            if b + 1 == warm:
                at_warm = collections_of(sim.sched)
            print(
                f"batch {b + 1}/{batches}: rss {samples[-1][1] / 2**20:.0f} MiB, "
                f"{samples[-1][2]:,} blocks allocated ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
    base = next(s for s in samples if s[0] == warm)
    after = [s for s in samples if s[0] >= warm]
    return {
        "workers": workers,
        "batches": batches,
        "warm": warm,
        "wall_s": time.monotonic() - t0,
        "samples": samples,
        "rss_base": base[1],
        "rss_end": samples[-1][1],
        "rss_max": max(s[1] for s in after),
        "blocks_base": base[2],
        "blocks_end": samples[-1][2],
        "blocks_max": max(s[2] for s in after),
        "at_warm": at_warm,
        "at_end": collections_of(sim.sched),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=10.0, help="simulated minutes of 1 s batches")
    p.add_argument("--sample-every", type=int, default=20, help="batches between samples")
    p.add_argument("--malloc-trim", action="store_true", help="malloc_trim(0) every 10 batches")
    p.add_argument("--fragment", default="scale_memory.md")
    args = p.parse_args(argv)
    c.print_machine()
    r = run(args.workers, args.minutes, args.sample_every, args.malloc_trim)
    rss_growth = r["rss_end"] / r["rss_base"] - 1
    rss_max_growth = r["rss_max"] / r["rss_base"] - 1
    blk_growth = r["blocks_end"] / r["blocks_base"] - 1
    print(
        f"{r['workers']} workers, {r['batches']} batches: RSS {r['rss_base'] / 2**20:.0f} -> "
        f"{r['rss_end'] / 2**20:.0f} MiB ({rss_growth * 100:+.1f}%, max "
        f"{rss_max_growth * 100:+.1f}%), allocated blocks {blk_growth * 100:+.1f}%",
        flush=True,
    )
    names = list(r["at_end"])
    lines = [
        "## Coordinator memory at scale (simulated workers, real Plan + Scheduler)",
        "",
        f"Command: `.venv/bin/python -m bench.scale_memory --workers {args.workers} "
        f"--minutes {args.minutes:g}{' --malloc-trim' if args.malloc_trim else ''}`",
        "",
        f"{r['workers']:,} simulated workers x 4 input partitions, the `bench.scale` job, "
        f"{r['batches']} batches of 1 s in simulated time (back to back: the scheduler's "
        f"clock advances 1 s per batch; {r['wall_s'] / 60:.1f} min of wall time). Inputs "
        "retained 22 batches, state checkpointed every 10 batches (the coordinator's "
        f"defaults). Warm-up: the first {r['warm']} batches. RSS of the process and Python's "
        "allocated blocks (`sys.getallocatedblocks`, after a full collection) every "
        f"{args.sample_every} batches."
        + (
            " glibc `malloc_trim(0)` every 10 batches (as the worker does every 10 s)."
            if args.malloc_trim
            else ""
        ),
        "",
        "| figure | after warm-up | end | growth | max after warm-up |",
        "|---|---|---|---|---|",
        f"| RSS | {r['rss_base'] / 2**20:,.0f} MiB | {r['rss_end'] / 2**20:,.0f} MiB "
        f"| {rss_growth * 100:+.1f}% | {rss_max_growth * 100:+.1f}% |",
        f"| allocated blocks | {r['blocks_base']:,} | {r['blocks_end']:,} "
        f"| {blk_growth * 100:+.1f}% | {(r['blocks_max'] / r['blocks_base'] - 1) * 100:+.1f}% |",
        "",
        "Scheduler collections (entries), after warm-up and at the end:",
        "",
        "| " + " | ".join(names) + " |",
        "|" + "---|" * len(names),
        "| " + " | ".join(f"{r['at_warm'].get(n, 0):,}" for n in names) + " |",
        "| " + " | ".join(f"{r['at_end'][n]:,}" for n in names) + " |",
        "",
        f"Target: RSS growth after warm-up <= {TARGET_GROWTH * 100:.0f}%: "
        f"{rss_growth * 100:+.1f}% at the end, {rss_max_growth * 100:+.1f}% at most, "
        f"**{c.verdict(max(rss_growth, rss_max_growth), TARGET_GROWTH, False)}**.",
        "",
        f"![scale memory]({args.fragment.removesuffix('.md')}.png)",
        "",
    ]
    c.write_fragment(args.fragment, "\n".join(lines) + "\n")
    plot(r, args.fragment.removesuffix(".md") + ".png")
    return 0


def plot(r: dict[str, Any], name: str) -> None:
    plt = c.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    xs = [s[0] for s in r["samples"]]
    ax[0].plot(xs, [s[1] / 2**20 for s in r["samples"]], "o-")
    ax[0].axvline(r["warm"], color="grey", ls=":", label="end of warm-up")
    ax[0].set_xlabel("batch (1 s each, simulated)")
    ax[0].set_ylabel("coordinator RSS (MiB)")
    ax[0].set_ylim(bottom=0)
    ax[0].legend()
    ax[1].plot(xs, [s[2] / 1e6 for s in r["samples"]], "o-")
    ax[1].axvline(r["warm"], color="grey", ls=":")
    ax[1].set_xlabel("batch")
    ax[1].set_ylabel("Python allocated blocks (millions)")
    ax[1].set_ylim(bottom=0)
    fig.suptitle(f"{r['workers']:,} simulated workers")
    fig.tight_layout()
    out = c.RESULTS / name
    fig.savefig(out, dpi=90)
    print(f"wrote {out.relative_to(c.ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
