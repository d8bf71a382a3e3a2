"""Metadata per batch: what the coordinator writes to Redis for each batch, and how long.

The coordinator's real metadata path against a real Redis, for W workers x 4 input
partitions (``--workers``, default 1000: 4,000 partitions of one topic): per batch, every
partition is reported sealed (a few records each), then, as ``BatchClock.seal_batch``
does, :meth:`ReceiverTracker.continuing`, :meth:`ReceiverTracker.record_batch`, the
durable :meth:`RedisMetaLog.log_batch` and :meth:`ReceiverTracker.advance`; then, as
``Completion.persist`` does, :meth:`RedisMetaLog.complete` (the done mark, lineage older
than ``--keep`` batches forgotten, and every ``--checkpoint-every`` batches one checkpoint
pointer per partition).

Figures: time the coordinator spends logging a batch (p50/p99, target at most 20 ms),
time of the completion write, requests sent to Redis per batch (round trips: a redis-py
``send_packed_command`` each, counted on the connection) and their bytes, the stored
value's size (``HSTRLEN``), and the same counts for the write path before #16 (the ranges
as an explicit map, one request per checkpoint pointer, then the done mark, then
``HKEYS`` + ``HDEL`` to forget). The collector is tuned as in the coordinator process
(:func:`engine.scheduler.tune_gc`). Redis: the ``dstream dev up`` one when it runs, else a
private ``redis-server`` on a free loopback port.

    .venv/bin/python -m bench.metadata [--workers 1000] [--batches 200]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from bench import _common as c
from engine.codec import pack
from engine.plan import input_block_id
from engine.scheduler import tune_gc
from ops.coordinator.durable import DurableWriter
from ops.coordinator.receivers import ReceiverTracker
from ops.protocol import BlockReport
from state.metalog import OffsetRange, RedisMetaLog

PARTS_PER_WORKER = 4
TARGET_LOG_MS = 20.0
TOPIC = "pageviews"


class CountingConnection(redis.Connection):
    """A redis-py connection counting the requests it sends (round trips) and their bytes."""

    sent = 0
    sent_bytes = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        chunks = [command] if isinstance(command, bytes | str) else command
        CountingConnection.sent += 1
        CountingConnection.sent_bytes += sum(len(x) for x in chunks)
        super().send_packed_command(command, check_health)


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """The dev services' Redis if it runs, else a private one (stopped on exit)."""
    from ops.tools.devservices import DevServices, discovered_env

    found = discovered_env().get("redis_url")
    if found:
        yield found
        return
    with tempfile.TemporaryDirectory(prefix="bench-metadata-") as d:
        services = DevServices(Path(d))
        try:
            yield services.redis_url
        finally:
            services.close()


def _reports(tracker: ReceiverTracker, b: int, per_part: int) -> list[BlockReport]:
    """Every partition sealed with *per_part* records, from its position (two holders)."""
    out = []
    for (node, idx), pos in tracker.positions.items():
        rng = OffsetRange(TOPIC, idx, pos, pos + per_part, per_part)
        out.append(BlockReport(input_block_id(node, b, idx), rng, 100 * per_part, ["w1", "w2"]))
    return out


def _old_complete(log: RedisMetaLog, epoch: int, b: int, ckpts: Any, keep_from: int) -> None:
    """The completion writes before #16: one request per pointer, done, HKEYS + HDEL."""
    for node, part, cb in ckpts:
        log.set_checkpoint(epoch, node, part, cb)
    log.mark_done(epoch, b)
    log.forget_before(keep_from)


def measure(url: str, args: argparse.Namespace, old: bool) -> dict[str, Any]:
    """Run *args.batches* batches through the metadata path; figures per batch."""
    parts = args.workers * PARTS_PER_WORKER
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    app = c.unique("bench-meta")
    log = RedisMetaLog(client, app)
    epoch = log.bump_epoch()
    layout = {0: [(TOPIC, p) for p in range(parts)]}
    tracker = ReceiverTracker(layout, dict.fromkeys(((0, p) for p in range(parts)), 5_000_000))
    lock = threading.Lock()
    durable = DurableWriter(threading.Event(), lambda: None)
    log_ms: list[float] = []
    log_cpu_ms: list[float] = []
    complete_ms: list[float] = []
    ckpt_complete_ms: list[float] = []
    requests: list[int] = []
    sent: list[int] = []
    stored: list[int] = []
    explicit: list[int] = []
    profiler = cProfile.Profile()
    try:
        for b in range(args.batches + 1):
            reports = _reports(tracker, b, args.records)
            r0, s0 = CountingConnection.sent, CountingConnection.sent_bytes
            if b == args.batches // 2:
                profiler.enable()
            t0, cpu0 = time.perf_counter(), time.thread_time()
            # BatchClock.seal_batch: the tracker under the lock, then the durable write
            with lock:
                ok = tracker.continuing(reports)
                ranges = tracker.record_batch(b, 1000 * b, ok)
            if old:
                data = pack({"time_ms": b, "ranges": {k: list(v) for k, v in ranges.items()}})
                durable.write("log", client.hset, log.key("batches"), str(b), data)
            else:
                durable.write("log", log.log_batch, epoch, b, ranges, 1000 * b)
            with lock:
                tracker.advance(ok)
            t1, cpu1 = time.perf_counter(), time.thread_time()
            profiler.disable()
            ckpts = (
                [(2, p, b) for p in range(parts)]
                if args.checkpoint_every and b % args.checkpoint_every == 0
                else []
            )
            keep_from = b - args.keep
            if old:
                durable.write("done", _old_complete, log, epoch, b, ckpts, keep_from)
            else:
                durable.write("done", log.complete, epoch, b, ckpts, keep_from)
            t2 = time.perf_counter()
            if b == 0:
                continue  # the first batch loads the Lua scripts
            log_ms.append((t1 - t0) * 1000)
            log_cpu_ms.append((cpu1 - cpu0) * 1000)
            (ckpt_complete_ms if ckpts else complete_ms).append((t2 - t1) * 1000)
            requests.append(CountingConnection.sent - r0)
            sent.append(CountingConnection.sent_bytes - s0)
            stored.append(int(client.hstrlen(log.key("batches"), str(b))))
            explicit.append(
                len(pack({"time_ms": b, "ranges": {k: list(v) for k, v in ranges.items()}}))
            )
    finally:
        for k in client.scan_iter(match=f"dstream:{app}:*"):
            client.delete(k)
        client.close()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(12)
    plain = [
        r
        for i, r in enumerate(requests, 1)
        if not (args.checkpoint_every and i % args.checkpoint_every == 0)
    ]
    ck = [
        r
        for i, r in enumerate(requests, 1)
        if args.checkpoint_every and i % args.checkpoint_every == 0
    ]
    return {
        "variant": "before #16 (explicit map, a request per pointer)" if old else "now",
        "partitions": parts,
        "log_p50": c.pct(log_ms, 0.5),
        "log_p99": c.pct(log_ms, 0.99),
        "cpu_p50": c.pct(log_cpu_ms, 0.5),
        "cpu_p99": c.pct(log_cpu_ms, 0.99),
        "complete_p50": c.pct(complete_ms, 0.5),
        "ckpt_complete_p50": c.pct(ckpt_complete_ms, 0.5),
        "requests": sorted(set(plain)),
        "ckpt_requests": sorted(set(ck)),
        "sent_p50": c.pct([float(x) for x in sent], 0.5),
        "stored": c.pct([float(x) for x in stored], 0.5),
        "explicit": c.pct([float(x) for x in explicit], 0.5),
        "profile": out.getvalue(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--records", type=int, default=5, help="records per partition per batch")
    p.add_argument("--keep", type=int, default=20, help="batches of lineage kept")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--fragment", default="metadata.md")
    args = p.parse_args(argv)
    c.print_machine()
    tune_gc()  # as the coordinator process does (``run_coordinator``)
    load0 = os.getloadavg()[0]
    with redis_url() as url:
        rows = [measure(url, args, old=False), measure(url, args, old=True)]
    load = f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    for r in rows:
        print(
            f"{r['variant']}: {r['partitions']} partitions: logging a batch p50 "
            f"{r['log_p50']:.1f} ms p99 {r['log_p99']:.1f} ms (CPU p50 {r['cpu_p50']:.1f} ms p99 "
            f"{r['cpu_p99']:.1f} ms); completion {r['complete_p50']:.1f} ms ("
            f"{r['ckpt_complete_p50']:.1f} ms with {r['partitions']} checkpoint pointers); "
            f"requests/batch {r['requests']} ({r['ckpt_requests']} on checkpoint batches); "
            f"sent {r['sent_p50'] / 1024:.1f} KiB/batch; stored value {r['stored'] / 1024:.1f} KiB",
            flush=True,
        )
    now = rows[0]
    print(now["profile"])
    args_line = f"--workers {args.workers} --batches {args.batches}"
    lines = [
        "### Metadata per batch",
        "",
        f"Command: `.venv/bin/python -m bench.metadata {args_line}`. Machine: {c.machine_line()}.",
        "",
        f"{args.workers:,} workers x {PARTS_PER_WORKER} input partitions "
        f"({now['partitions']:,}), {args.records} records per partition per batch, "
        f"{args.batches} batches, lineage of {args.keep} batches kept, a checkpoint pointer "
        f"per partition every {args.checkpoint_every} batches; the coordinator's real "
        "tracker, durable writer and Redis metadata log against a real local Redis. "
        "Logging = `continuing` + `record_batch` + `log_batch` + `advance` (what "
        "`seal_batch` does between the seal answers and scheduling): wall time, and the "
        f"CPU time of the thread (unaffected by other processes). Load average: {load}.",
        "",
        "| write path | logging a batch p50 | p99 | its CPU p50 | p99 | completion p50 | "
        "with checkpoint pointers | Redis requests per batch | on checkpoint batches | bytes "
        "sent per batch | stored per batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['variant']} | {r['log_p50']:.1f} ms | {r['log_p99']:.1f} ms | "
            f"{r['cpu_p50']:.1f} ms | {r['cpu_p99']:.1f} ms | {r['complete_p50']:.1f} ms | "
            f"{r['ckpt_complete_p50']:.1f} ms | "
            f"{', '.join(map(str, r['requests']))} | {', '.join(map(str, r['ckpt_requests']))} "
            f"| {r['sent_p50'] / 1024:.1f} KiB | {r['stored'] / 1024:.1f} KiB |"
            for r in rows
        ],
        "",
        f"Target: logging a batch at most {TARGET_LOG_MS:g} ms: wall time p50 "
        f"{c.verdict(now['log_p50'], TARGET_LOG_MS, higher_is_better=False)}, p99 "
        f"{c.verdict(now['log_p99'], TARGET_LOG_MS, higher_is_better=False)}; CPU time p99 "
        f"{c.verdict(now['cpu_p99'], TARGET_LOG_MS, higher_is_better=False)}; requests "
        "per batch constant (see `tests/integration/test_metadata_writes.py`: 2 for 4, 400 "
        "and 4,000 partitions).",
        "",
    ]
    c.write_fragment(args.fragment, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
