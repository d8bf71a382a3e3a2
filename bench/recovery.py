"""Recovery from a lost worker: kill -9 one of 3 workers under steady load.

For each checkpoint interval (``--checkpoints``, default 2, 10 and 30 batches, i.e. 2 s,
10 s and 30 s at 1 s batches, ``DSTREAM_CHECKPOINT_EVERY``):

1. a fresh 4-partition input topic and output topic, and a fresh 3-worker fleet of
   ``examples/pageviews.py`` (running count per url, ``to_kafka``), 1 s batches;
2. ``ops.tools.produce.produce_pageviews`` in a thread of this process at ``--rate`` (default
   20% of the fleet's measured maximum, :func:`bench._common.max_rate`) for the whole run;
3. ``/api/status`` polled every 0.1 s (worker ids, batches);
4. after ``--warmup`` + ``--steady`` seconds, at the next batch just before a checkpoint
   (worst case), ``kill -9`` of the worker process that ran the most reduce/state tasks (a
   child of ``dstream run`` whose argv holds ``worker``; ``dstream run`` starts a new one);
5. the producer goes on for ``--after`` seconds, then the fleet catches up and the final
   count per url in the output topic (``read_committed``, last value by batch) is compared
   with the count of the input topic's records per url (the message key is the url).

Figures: time to detection = from the kill to the first poll whose worker list lacks one of
the ids listed at the kill (the coordinator declares a worker lost after
``heartbeat_misses`` x ``heartbeat_interval`` of silence, 3 x 0.5 s by default); normal =
median total delay of the batches completed in the ``--steady`` seconds before the kill;
a batch is *abnormal* above 1.5x normal; back to normal = from the kill to the completion of
the first of 3 normal batches in a row after the first abnormal one (0 when no batch was
abnormal; abnormal batches after that are counted apart, as noise); worst excess = the
largest (total delay - normal) of the batches completed after the kill.
Targets: worst excess <= 3 s, back to normal <= 10 s.

    .venv/bin/python -m bench.recovery [--checkpoints 2,10,30] [--rate 50000]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench import _common as c

TARGET_EXCESS_S = 3.0
TARGET_NORMAL_S = 10.0
ABNORMAL = 1.5
IN_A_ROW = 3
APP = "examples/pageviews.py"


# --------------------------------------------------------------------------- topics
def _consumer(bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": c.unique("bench-read"),
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )


def _read_all(bootstrap: str, topic: str, each: Any) -> None:
    """Call *each(msg)* for every message of *topic* up to its current end."""
    cons = _consumer(bootstrap)
    try:
        md = cons.list_topics(topic, timeout=10)
        parts = list(md.topics[topic].partitions)
        ends = {
            p: cons.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts
        }
        left = {p for p in parts if ends[p] > 0}
        cons.assign([TopicPartition(topic, p, 0) for p in parts])
        deadline = time.monotonic() + 120
        idle_since = time.monotonic()
        while left and time.monotonic() < deadline:
            msgs = cons.consume(10000, 0.5)
            for m in msgs:
                if m.error() is None:
                    each(m)
            if msgs:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 3:
                break  # nothing more arrives (a tail of transaction markers only)
            # read_committed skips transaction markers: the position says where we are
            for tp in cons.position([TopicPartition(topic, p) for p in list(left)]):
                if tp.offset >= ends[tp.partition]:
                    left.discard(tp.partition)
    finally:
        cons.close()


def input_counts(bootstrap: str, topic: str) -> collections.Counter[str]:
    """Records per url of the input topic (the message key is the url)."""
    n: collections.Counter[str] = collections.Counter()

    def each(m: Any) -> None:
        n[m.key().decode()] += 1

    _read_all(bootstrap, topic, each)
    return n


def output_counts(bootstrap: str, topic: str) -> tuple[dict[str, int], int]:
    """(last committed count per url by batch, (url, batch) pairs written more than once)."""
    last: dict[str, tuple[int, int]] = {}
    seen: set[tuple[str, int]] = set()
    dup = 0

    def each(m: Any) -> None:
        nonlocal dup
        url = json.loads(m.key())
        batch = int(dict(m.headers() or [])["dstream-batch"])
        if (url, batch) in seen:
            dup += 1
        seen.add((url, batch))
        if url not in last or last[url][0] < batch:
            last[url] = (batch, json.loads(m.value()))

    _read_all(bootstrap, topic, each)
    return {u: v for u, (_, v) in last.items()}, dup


# --------------------------------------------------------------------------- one run
class Poller(threading.Thread):
    """Polls ``/api/status`` every *every* s: (wall time, worker ids) and the batches."""

    def __init__(self, fleet: c.Fleet, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.fleet = fleet
        self.every = every
        self.samples: list[tuple[float, list[str]]] = []
        self.last: dict[str, Any] = {}
        self.done_seen: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            st = self.fleet.status(timeout=1.0)
            now = time.time()
            if st is not None:
                self.last = st
                self.samples.append((now, [w["id"] for w in st.get("workers", [])]))
                for b in st.get("batches", []):
                    if b["total_delay"] is not None and b["batch"] not in self.done_seen:
                        self.done_seen[b["batch"]] = now
            self.stop.wait(self.every)


def pick_victim(f: c.Fleet, st: dict[str, Any], pids: list[int]) -> int:
    """The worker pid that ran the most reduce/state tasks (the state chain follows
    locality, so that worker holds the most state partitions), else the first worker.

    Worker ids in the status are RPC addresses; a worker's HTTP port is matched to its pid
    through ``/proc/<pid>/net/tcp`` listening sockets owned by the pid's inodes.
    """
    from bench.straggler import task_metrics

    best, most = pids[0], -1.0
    for w in st.get("workers", []):
        n = task_metrics(w["http_port"]).get("reduce", (0.0, 0.0))[0]
        pid = _pid_listening(w["http_port"], pids)
        if pid is not None and n > most:
            best, most = pid, n
    return best


def _pid_listening(port: int, pids: list[int]) -> int | None:
    import pathlib

    inodes: set[str] = set()
    for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and int(f[1].split(":")[1], 16) == port:
            inodes.add(f[9])
    for pid in pids:
        fd = pathlib.Path(f"/proc/{pid}/fd")
        try:
            for link in fd.iterdir():
                target = os.readlink(link)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None


def one_run(args: argparse.Namespace, rate: float, every: int) -> dict[str, Any]:
    bootstrap, _ = c.services()
    inp, out = c.unique("bench-rec-in"), c.unique("bench-rec-out")
    c.create_topic(bootstrap, inp, args.partitions)
    c.create_topic(bootstrap, out, 2)
    env = {
        "PAGEVIEWS_TOPIC": inp,
        "PAGEVIEWS_OUTPUT": out,
        "DSTREAM_BATCH_INTERVAL": str(args.interval),
        "DSTREAM_CHECKPOINT_EVERY": str(every),
    }
    from ops.tools.produce import produce_pageviews

    duration = args.warmup + args.steady + every * args.interval + args.after
    produced: dict[str, Any] = {}

    def feed() -> None:
        produced["r"] = produce_pageviews(
            bootstrap, inp, rate=rate, duration=duration, keys=args.keys, seed=every
        )

    print(f"\n--- checkpoint every {every} batches, {rate:,.0f} records/s", flush=True)
    res: dict[str, Any] = {"every": every, "rate": rate}
    with c.run_fleet(APP, workers=args.workers, env=env, log_dir=c.RESULTS / "logs") as f:
        f.wait_ready()
        poller = Poller(f)
        poller.start()
        feeder = threading.Thread(target=feed, daemon=True)
        t_start = time.time()
        feeder.start()
        time.sleep(args.warmup + args.steady)
        # kill just before the next checkpoint (the worst case: every - 1 batches of state
        # to rebuild); workers checkpoint after batch b when (b + 1) % every == 0
        until = time.monotonic() + every * args.interval + 5
        while time.monotonic() < until:
            nb = poller.last.get("next_batch", 0)
            if every <= 1 or (nb % every == every - 1 and nb >= every - 1):
                break
            time.sleep(0.05)
        workers = f.roles()["worker"]
        ids_at_kill = set(poller.samples[-1][1]) if poller.samples else set()
        stats_before = dict(poller.last.get("stats", {}))
        victim = pick_victim(f, poller.last, workers)
        t_kill = time.time()
        res["kill_batch"] = poller.last.get("next_batch", -1)  # first batch not yet sealed
        os.kill(victim, signal.SIGKILL)
        print(f"kill -9 worker pid {victim} at t={t_kill - t_start:.1f}s", flush=True)
        feeder.join()
        t_prod_end = time.time()
        # catch up: every batch sealed up to the producer's end is done
        deadline = time.monotonic() + args.catch_up
        while time.monotonic() < deadline:
            st = poller.last
            done = [b for b in f.seen.values() if b["total_delay"] is not None]
            if (
                done
                and max(b["time_ms"] for b in done) / 1000 > t_prod_end + 2 * args.interval
                and not st.get("pending")
            ):
                break
            time.sleep(0.5)
        poller.stop.set()
        poller.join()
        res["workers_after"] = f.roles()["worker"]
        res["stats"] = dict(poller.last.get("stats", {}))
        res["stats_before"] = stats_before
        res["log"] = f.log_path
        lost_lines = [ln for ln in f.log_tail(400).splitlines() if " lost" in ln]
        res["lost_lines"] = lost_lines[:3]
        batches = sorted(
            (b for b in f.seen.values() if b["total_delay"] is not None), key=lambda b: b["batch"]
        )
    res.update(t_start=t_start, t_kill=t_kill, victim=victim, produced=produced.get("r"))
    # detection: the first poll lacking an id present at the kill
    res["detect_s"] = next(
        (t - t_kill for t, ids in poller.samples if t > t_kill and ids_at_kill - set(ids)),
        float("nan"),
    )
    res["rejoin_s"] = next(
        (
            t - t_kill
            for t, ids in poller.samples
            if t > t_kill and len(ids) >= args.workers and set(ids) != ids_at_kill
        ),
        float("nan"),
    )
    res.update(analyse(batches, t_kill, args))  # keeps res["kill_batch"]
    # exactness
    t0 = time.monotonic()
    expected = input_counts(bootstrap, inp)
    got, dup = output_counts(bootstrap, out)
    for _ in range(10):  # the last transaction may still be landing
        if got == dict(expected):
            break
        time.sleep(1)
        got, dup = output_counts(bootstrap, out)
    res["records"] = sum(expected.values())
    res["exact"] = got == dict(expected) and dup == 0
    res["dup"] = dup
    res["wrong"] = sum(1 for u in set(expected) | set(got) if got.get(u) != expected.get(u))
    print(
        f"exactness: {res['records']:,} input records, {len(expected)} urls; output "
        f"final counts {'EQUAL' if got == dict(expected) else 'DIFFER'} "
        f"({res['wrong']} urls differ), {dup} (url, batch) written twice "
        f"[checked in {time.monotonic() - t0:.1f}s]",
        flush=True,
    )
    print(
        f"detection {res['detect_s']:.2f}s, replacement worker joined {res['rejoin_s']:.2f}s; "
        f"normal {res['normal']:.3f}s; worst excess {res['excess']:.2f}s; back to normal "
        f"{res['to_normal']:.1f}s",
        flush=True,
    )
    return res


def analyse(batches: list[dict[str, Any]], t_kill: float, args: argparse.Namespace) -> dict:
    """Normal delay, worst excess and time back to normal (see the module docstring)."""
    rows = [
        (b["batch"], b["time_ms"] / 1000, b["total_delay"], b["time_ms"] / 1000 + b["total_delay"])
        for b in batches
    ]
    pre = [d for _, t, d, done in rows if done < t_kill and t >= t_kill - args.steady]
    normal = c.median(pre)
    after = [r for r in rows if r[3] >= t_kill]
    excess = max((d - normal for _, _, d, _ in after), default=float("nan"))
    ok = [r[2] <= ABNORMAL * normal for r in after]
    bad = [i for i, good in enumerate(ok) if not good]
    to_normal, back = 0.0, 0
    if bad:
        # the first of IN_A_ROW normal batches in a row after the first abnormal one
        to_normal = float("nan")
        for i in range(bad[0] + 1, len(after) - IN_A_ROW + 1):
            if all(ok[i : i + IN_A_ROW]):
                to_normal, back = after[i][3] - t_kill, i
                break
    later = sum(1 for i in bad if back and i > back)
    return {
        "rows": rows,
        "normal": normal,
        "pre_batches": len(pre),
        "excess": excess,
        "abnormal": len(bad) - later,
        "later": later,
        "to_normal": to_normal,
        "max_delay": max((d for _, _, d, _ in after), default=float("nan")),
    }


# --------------------------------------------------------------------------- report
def report(runs: list[dict[str, Any]], rate: float, source: str, args: argparse.Namespace) -> str:
    cmd = f".venv/bin/python -m bench.recovery --checkpoints {args.checkpoints}"
    if args.rate:
        cmd += f" --rate {args.rate:g}"
    lines = [
        "## Recovery from a lost worker (kill -9)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Fleet: `{APP}` (running count per url, `to_kafka`), {args.workers} workers, "
        f"{args.interval:g} s batches, {args.partitions} input partitions, {args.keys} urls; "
        f"input: `ops.tools.produce.produce_pageviews` in a thread of the bench at {rate:,.0f} "
        f"records/s ({source}) until {args.after:g} s after the kill; `kill -9` of the "
        "worker that ran the most "
        f"state/reduce tasks, at the first batch >= {args.warmup + args.steady:g} s after the "
        "input starts that is just before a checkpoint (worst case: every - 1 batches of state "
        "to rebuild; `dstream run` starts a replacement). `/api/status` polled every 0.1 s. "
        f"Detection = kill to the first poll without the killed worker's id; normal = median "
        f"total delay of the batches completed in the {args.steady:g} s before the kill; "
        f"abnormal = above {ABNORMAL}x normal; back to normal = kill to the completion of the "
        f"first of {IN_A_ROW} normal batches in a row after the first abnormal one (later "
        "abnormal batches are counted apart: noise of the shared machine); worst "
        "excess = largest (total delay - normal) of the batches completed after the kill. "
        "Exact = final count per url in the output topic (`read_committed`, last by batch) "
        "equals the input topic's records per url, and no (url, batch) written twice.",
        "",
        "| checkpoint every | detection | replacement joined | normal total delay "
        "| worst batch delay | worst excess (target <= 3 s) | abnormal batches "
        "| back to normal (target <= 10 s) | later abnormal | batches since checkpoint "
        "| recomputed tasks | records | exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        recomputed = r["stats"].get("recomputed", 0) - r["stats_before"].get("recomputed", 0)
        # workers checkpoint state after batch b when (b + 1) % every == 0
        kb = r["kill_batch"]
        last_ckpt = kb // r["every"] * r["every"] - 1
        since = f"{kb - 1 - last_ckpt}" if last_ckpt >= 0 else f"{kb} (none yet)"
        # (batches kb-1-last_ckpt = every - 1 when the kill came just before a checkpoint)
        lines.append(
            f"| {r['every']} batches ({r['every'] * args.interval:g} s) | {r['detect_s']:.2f} s "
            f"| {r['rejoin_s']:.2f} s | {r['normal'] * 1000:.0f} ms "
            f"| {r['max_delay']:.2f} s | {r['excess']:.2f} s "
            f"({c.verdict(r['excess'], TARGET_EXCESS_S, False)}) | {r['abnormal']} "
            f"| {r['to_normal']:.1f} s ({c.verdict(r['to_normal'], TARGET_NORMAL_S, False)}) "
            f"| {r['later']} | {since} | {recomputed} | {r['records']:,} | {r['exact']} |"
        )
    lines += [
        "",
        "Total delay per batch (s), batch time relative to the kill (`+0` = first batch "
        "sealed after it), first 16 batches from the last one sealed before the kill:",
        "",
    ]
    for r in runs:
        row = [(t - r["t_kill"], d) for _, t, d, _ in r["rows"] if t > r["t_kill"] - 1][:16]
        lines.append(f"- every {r['every']}: " + " ".join(f"`{x:+.0f}` {d:.2f}" for x, d in row))
    ok_ex = all(r["excess"] <= TARGET_EXCESS_S for r in runs)
    ok_n = all(r["to_normal"] <= TARGET_NORMAL_S for r in runs)
    lines += [
        "",
        f"Targets: no batch more than 3 s beyond normal: **{'met' if ok_ex else 'missed'}**; "
        f"back to normal within 10 s: **{'met' if ok_n else 'missed'}**; output exact in "
        f"every run: **{all(r['exact'] for r in runs)}**.",
        "",
        "![recovery](recovery.png)",
        "",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    plt = c.plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), sharey=True)
    if len(runs) == 1:
        axes = [axes]
    for ax, r in zip(axes, runs, strict=True):
        xs = [t - r["t_kill"] for _, t, _, _ in r["rows"]]
        ys = [d for _, _, d, _ in r["rows"]]
        ax.plot(xs, ys, marker=".", lw=1)
        ax.axvline(0, color="red", ls="--", label="kill -9")
        if r["detect_s"] == r["detect_s"]:
            ax.axvline(r["detect_s"], color="orange", ls=":", label="detected")
        ax.axhline(ABNORMAL * r["normal"], color="grey", ls=":", label=f"{ABNORMAL}x normal")
        ax.set_title(f"checkpoint every {r['every'] * args.interval:g} s")
        ax.set_xlabel("batch time - kill time (s)")
        ax.set_xlim(-args.steady, args.after + 5)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("batch total delay (s)")
    fig.tight_layout()
    out = c.RESULTS / "recovery.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out.relative_to(c.ROOT)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--checkpoints", default="2,10,30", help="batches between checkpoints")
    c.add_load_args(p)
    p.add_argument("--steady", type=float, default=15.0)
    p.add_argument("--after", type=float, default=25.0)
    p.add_argument("--catch-up", type=float, default=90.0)
    p.add_argument("--fragment", default="recovery.md")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    c.print_machine()
    rate, source = c.run_rate(args.rate, args.level, args.max_rate)
    runs = [one_run(args, rate, int(e)) for e in args.checkpoints.split(",") if e]
    text = report(runs, rate, source, args)
    print(text)
    c.write_fragment(args.fragment, text)
    if not args.no_plot:
        plot(runs, args)
    return 0 if all(r["exact"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
