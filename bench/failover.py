"""Failover to a standby coordinator: kill -9, and SIGSTOP past the lease, of the leader.

Two runs (``--faults``, default ``kill,stop``), each on a fresh 4-partition input topic, a
fresh output topic and a fresh app id:

1. the topology of a deployment, every role its own process: two ``dstream coordinator``
   processes of ``examples/pageviews.py`` (running count per url, ``to_kafka``) on one RPC
   port at 127.0.0.1 and 127.0.0.2 (``--bind-host``; the first started leads, the second
   stands by), and ``--workers`` (3) ``dstream worker`` processes; every process has both
   addresses in ``DSTREAM_COORDINATOR``. 1 s batches, the default lease
   (``DSTREAM_LEASE_SECONDS``, 2 s) and checkpoints (every 10 s);
2. ``dstream produce`` (a child process: its CPU is not this process's) at ``--rate``
   (default 20% of the fleet's measured maximum, :func:`bench._common.max_rate`) for
   ``--warmup`` + ``--steady`` + ``--after`` seconds;
3. ``/api/status`` of both coordinators polled every 0.1 s (one thread each, so a paused
   one does not hold up the other), keeping every completed batch (``batch``, ``time_ms``,
   ``total_delay``) and when it was first seen;
4. after ``--warmup`` + ``--steady`` seconds, the fault on the leader: ``kill``: SIGKILL;
   ``stop``: SIGSTOP, then SIGCONT ``--resume-after`` (2) s after the standby leads; the
   woken leader must find itself deposed and exit with code 4 (``LOST_LEADERSHIP``);
5. the standby's ``/readyz`` polled every 25 ms from the fault until it answers 200;
6. when the input ends and the fleet has caught up, the committed output is checked.

Figures, with t_fault the wall time the signal was sent:

* **standby leads** = first 200 of the standby's ``/readyz`` - t_fault (it answers 200
  once it holds the lease and has loaded the metadata log). Target <= 3 s.
* **batch delay** of batch b (sealed at t_b = ``time_ms``, completed at done_b) =
  done_b - min(t_b, t_{b-1} + interval). For a batch sealed on the clock this is
  ``total_delay`` of ``/api/status`` (done_b = t_b + total_delay). Two kinds of batch need
  more, since ``total_delay`` counts from the moment the coordinator that ran the batch
  sealed or replayed it: the new leader's first batch holds every record since the last
  batch the old leader logged, so its delay counts from t_{b-1} + interval (what Spark
  reports for the batches of a driver's downtime); and a batch the old leader logged but
  did not finish, replayed by the new leader, has done_b = when its completion was first
  seen in the new leader's status (at most ~0.1 s late).
* **normal** = median batch delay of the batches completed in the ``--steady`` seconds
  before the fault.
* **worst beyond normal** = the largest (batch delay - normal) among the batches completed
  after the fault. Target <= 5 s.
* **normal again** = done_B - t_fault, where B is the first batch completed after the fault
  such that B and every later batch sealed while the input flows have a batch delay
  <= normal + 0.5 s (0 when none exceeds it). Target <= 10 s.
* informative: **workers rejoined** = the last "worker ... joined" line of the new leader's
  log - t_fault; **first new batch done** = the completion of its first batch that is not
  a replay - t_fault; **fenced output tasks** = its tasks that failed on a fenced Kafka
  transaction and ran again; the worst ``total_delay`` of ``/api/status`` after the
  fault, for comparison with the batch delay.
* **exact**: the final count per url in the output topic (``read_committed``) equals the
  input topic's records per url, every (url, batch) is written once
  (``dstream-batch-seq``) and each url's counts strictly increase with the batch. Any
  run that is not exact (or a paused leader that does not exit with 4) makes the bench
  exit 1.

Each run's figures and batch list are also written to ``bench/results/logs/APP_ID-FAULT.json``
next to the processes' logs. A run takes about a minute (35 s of input, start-up, and
reading both topics back).

    .venv/bin/python -m bench.failover [--faults kill,stop] [--rate 50000]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import _common as c
from bench.recovery import _read_all, input_counts
from ops.coordinator import LOST_LEADERSHIP

TARGET_LEADS_S = 3.0
TARGET_EXCESS_S = 5.0
TARGET_NORMAL_S = 10.0
#: a batch delay within normal + this is normal
TOLERANCE_S = 0.5
#: /readyz of the standby is polled this often after the fault
READY_POLL_S = 0.025
#: /api/status of each coordinator is polled this often
STATUS_POLL_S = 0.1
APP = "examples/pageviews.py"
HOSTS = ("127.0.0.1", "127.0.0.2")
#: how the batch list marks a replayed batch and the new leader's first (gap) batch
MARK = {"replayed": "r", "gap": "g"}
FAULTS = {"kill": "kill -9 of the leader", "stop": "SIGSTOP of the leader past its lease"}


# --------------------------------------------------------------------------- processes
def _get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """(HTTP status, body) of a GET; status 0 when nothing answered in time."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return 0, b""


@dataclass
class Role:
    """One fleet process (``dstream coordinator`` or ``dstream worker``), its log in a file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    host: str = ""
    http_port: int = 0

    def start(self) -> Role:
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", *self.argv],
                cwd=c.ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.http_port}{path}"

    def ready(self, timeout: float = 1.0) -> bool:
        """A coordinator's ``/readyz``: 200 only while it leads."""
        return _get(self.url("/readyz"), timeout)[0] == 200

    def status(self, timeout: float = 1.0) -> dict[str, Any]:
        code, body = _get(self.url("/api/status"), timeout)
        return json.loads(body) if code == 200 else {}

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def stop(self) -> None:
        """SIGCONT (it may be paused), SIGTERM, then SIGKILL after 20 s."""
        if not self.alive():
            return
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
            self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Seen:
    """A completed batch as a coordinator's ``/api/status`` reported it."""

    batch: int
    time_s: float
    total_delay: float
    first_seen: float
    by: str


@dataclass
class StatusPoller:
    """Polls one coordinator's ``/api/status`` every :data:`STATUS_POLL_S` on a thread."""

    coord: Role
    batches: dict[int, Seen]
    lock: threading.Lock
    last: dict[str, Any] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> StatusPoller:
        threading.Thread(target=self._run, daemon=True, name=f"poll-{self.coord.host}").start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            st = self.coord.status(timeout=1.0)
            now = time.time()
            if st:
                self.last = st
            for b in st.get("batches", []):
                if b["total_delay"] is None:
                    continue
                with self.lock:
                    if b["batch"] not in self.batches:
                        self.batches[b["batch"]] = Seen(
                            b["batch"], b["time_ms"] / 1000, b["total_delay"], now, self.coord.host
                        )
            self.stop.wait(STATUS_POLL_S)


class Topology:
    """Two coordinators (one RPC port, two loopback addresses) and N workers."""

    def __init__(self, args: argparse.Namespace, topics: tuple[str, str], log_dir: Path):
        from ops.tools.devservices import free_port

        bootstrap, redis_url = c.services()
        self.app_id = c.unique("bench-failover")
        rpc_port = free_port()
        self.env = {
            **os.environ,
            "DSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "DSTREAM_REDIS_URL": redis_url,
            "DSTREAM_APP_ID": self.app_id,
            "DSTREAM_SECRET": secrets.token_hex(16),
            "DSTREAM_COORDINATOR": ",".join(f"{h}:{rpc_port}" for h in HOSTS),
            "DSTREAM_BATCH_INTERVAL": f"{args.interval:g}",
            "DSTREAM_LOG_LEVEL": "INFO",
            "PAGEVIEWS_TOPIC": topics[0],
            "PAGEVIEWS_OUTPUT": topics[1],
        }
        log_dir.mkdir(parents=True, exist_ok=True)
        self.coordinators: list[Role] = []
        for h in HOSTS:
            port = free_port()
            argv = ["coordinator", "--app", APP, "--bind-host", h, "--http-port", str(port)]
            argv += ["--expect-workers", str(args.workers)]
            log = log_dir / f"{self.app_id}-coordinator-{h}.log"
            self.coordinators.append(Role(f"coordinator {h}", argv, self.env, log, None, h, port))
        wargv = ["worker", "--app", APP, "--rpc-port", "0", "--http-port", "0"]
        self.workers = [
            Role(f"worker {i}", wargv, self.env, log_dir / f"{self.app_id}-worker-{i}.log")
            for i in range(args.workers)
        ]

    def start(self, timeout: float = 90.0) -> None:
        """The first coordinator, once it leads the second, once it stands by; the workers."""
        first, second = self.coordinators
        first.start()
        self._wait(first.ready, timeout, f"{first.name} to lead")
        second.start()
        self._wait(
            lambda: second.status().get("role") == "standby", timeout, f"{second.name} standby"
        )
        for w in self.workers:
            w.start()
        self._wait(
            lambda: (
                len(first.status().get("workers", [])) == len(self.workers)
                and bool(first.status().get("batches"))
            ),
            timeout,
            "every worker registered and a first batch",
        )

    def _wait(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            dead = [r.name for r in self.coordinators + self.workers if r.proc and not r.alive()]
            if dead:
                break
            time.sleep(0.1)
        tails = "\n".join(
            f"== {r.name}\n" + "\n".join(r.log().splitlines()[-15:])
            for r in self.coordinators + self.workers
            if r.proc
        )
        msg = f"timed out waiting for {what}\n{tails}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        for r in self.workers + self.coordinators:
            r.stop()


# --------------------------------------------------------------------------- exactness
def check_output(bootstrap: str, inp: str, out: str) -> dict[str, Any]:
    """The committed output against the counts of the whole input (see the docstring)."""
    expected = input_counts(bootstrap, inp)
    rows: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)

    def each(m: Any) -> None:
        seq = int(dict(m.headers() or [])["dstream-batch-seq"])
        rows[json.loads(m.key())].append((seq, json.loads(m.value())))

    _read_all(bootstrap, out, each)
    dup = not_increasing = 0
    final: dict[str, int] = {}
    for url, r in rows.items():
        r.sort()
        seqs = [s for s, _ in r]
        dup += len(seqs) - len(set(seqs))
        values = [v for _, v in r]
        not_increasing += values != sorted(set(values))
        final[url] = values[-1]
    wrong = sum(1 for u in set(expected) | set(final) if final.get(u) != expected.get(u))
    return {
        "records": sum(expected.values()),
        "urls": len(expected),
        "final_equal": final == dict(expected),
        "wrong": wrong,
        "dup": dup,
        "not_increasing": not_increasing,
        "exact": final == dict(expected) and dup == 0 and not_increasing == 0,
    }


# --------------------------------------------------------------------------- one run
def wait_ready(coord: Role, since: float, limit: float) -> float:
    """Poll *coord*'s ``/readyz`` every :data:`READY_POLL_S`; seconds from *since* to 200."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if coord.ready(timeout=0.5):
            return time.time() - since
        time.sleep(READY_POLL_S)
    return float("nan")


def one_run(args: argparse.Namespace, rate: float, fault: str) -> dict[str, Any]:
    bootstrap, _ = c.services()
    inp, out = c.unique("bench-fo-in"), c.unique("bench-fo-out")
    c.create_topic(bootstrap, inp, args.partitions)
    c.create_topic(bootstrap, out, 2)
    print(f"\n--- {FAULTS[fault]}, {rate:,.0f} records/s", flush=True)
    topo = Topology(args, (inp, out), c.RESULTS / "logs")
    res: dict[str, Any] = {"fault": fault, "rate": rate, "app_id": topo.app_id}
    lock = threading.Lock()
    seen: dict[int, Seen] = {}
    pollers: list[StatusPoller] = []
    try:
        topo.start()
        old, new = topo.coordinators
        pollers = [StatusPoller(co, seen, lock).start() for co in topo.coordinators]
        duration = args.warmup + args.steady + args.after
        with c.producer(inp, rate, duration, partitions=args.partitions) as prod:
            t_start = time.time()
            time.sleep(args.warmup + args.steady)
            t_fault = time.time()
            os.kill(old.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            res["leads_s"] = wait_ready(new, t_fault, 60)
            t_lead = t_fault + res["leads_s"]
            print(
                f"{fault} of {old.name} (pid {old.pid}) at t={t_fault - t_start:.1f}s; "
                f"{new.name} leads after {res['leads_s']:.3f}s",
                flush=True,
            )
            if fault == "stop":
                time.sleep(max(0.0, t_lead + args.resume_after - time.time()))
                os.kill(old.pid, signal.SIGCONT)
                res["resumed_s"] = time.time() - t_fault
                try:
                    assert old.proc is not None
                    res["old_exit"] = old.proc.wait(15)
                except subprocess.TimeoutExpired:
                    res["old_exit"] = None
                m = re.search(r"stepping down \((\d+) actions refused", old.log())
                res["refused"] = int(m.group(1)) if m else None
                print(
                    f"SIGCONT at +{res['resumed_s']:.1f}s: the old leader exited with "
                    f"{res['old_exit']} ({res['refused']} actions refused)",
                    flush=True,
                )
            else:
                assert old.proc is not None
                old.proc.wait(10)
                res["old_exit"] = old.proc.returncode
            prod.wait(duration + 60)
            t_end = time.time()
        # caught up: a batch sealed after the input ended is done, nothing pending
        deadline = time.monotonic() + args.catch_up
        while time.monotonic() < deadline:
            st = pollers[1].last
            with lock:
                newest = max((s.time_s for s in seen.values()), default=0.0)
            if newest > t_end + 2 * args.interval and not st.get("pending"):
                break
            time.sleep(0.5)
        res["caught_up"] = time.monotonic() < deadline
        res["epoch"] = pollers[1].last.get("epoch")
    finally:
        for p in pollers:
            p.stop.set()
        topo.stop()
        c.cleanup_redis(topo.app_id)
    res.update(t_start=t_start, t_fault=t_fault, t_lead=t_lead, t_end=t_end)
    res.update(takeover_log(topo.coordinators[1].log(), t_fault, args.workers))
    res.update(analyse(sorted(seen.values(), key=lambda s: s.batch), res, args))
    t0 = time.monotonic()
    res.update(check_output(bootstrap, inp, out))
    dump = c.RESULTS / "logs" / f"{topo.app_id}-{fault}.json"
    dump.write_text(json.dumps(res, indent=1, default=str))
    print(
        f"exactness: {res['records']:,} input records, {res['urls']} urls; final counts "
        f"{'EQUAL' if res['final_equal'] else 'DIFFER'} ({res['wrong']} urls differ), "
        f"{res['dup']} (url, batch) written twice, {res['not_increasing']} urls not strictly "
        f"increasing [checked in {time.monotonic() - t0:.1f}s]",
        flush=True,
    )
    print(
        f"standby leads {res['leads_s']:.2f}s; first batch of the new leader done "
        f"{res['first_new_s']:.2f}s; normal {res['normal']:.3f}s; worst delay "
        f"{res['worst']:.2f}s (beyond normal {res['excess']:.2f}s); normal again "
        f"{res['to_normal']:.2f}s",
        flush=True,
    )
    return res


def _log_time(line: str) -> float:
    """Wall time of a log line (``asctime``: local time, milliseconds after a comma)."""
    stamp, ms = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def takeover_log(log: str, t_fault: float, workers: int) -> dict[str, Any]:
    """From the new leader's log: when it led, when every worker had joined it, and how
    many of its tasks failed on a fenced Kafka transaction (seconds from the fault)."""
    lines = [ln for ln in log.splitlines() if ln[:2] == "20" and ln[23:24] == " "]
    led = next((_log_time(ln) for ln in lines if " leads (app " in ln), float("nan"))
    joined = [_log_time(ln) for ln in lines if ln.endswith("slots)") and " joined (" in ln]
    return {
        "led_log_s": led - t_fault,
        "rejoined_s": max(joined) - t_fault if len(joined) >= workers else float("nan"),
        "fenced_tasks": sum(1 for ln in lines if " failed on " in ln and ": fenced: " in ln),
    }


def analyse(seen: list[Seen], res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Batch delays, normal, worst beyond normal and normal again (module docstring)."""
    t_fault, t_end, iv = res["t_fault"], res["t_end"], args.interval
    old_host = HOSTS[0]
    times = {s.batch: s.time_s for s in seen}
    rows = []  # (batch, time, done, delay, status total_delay, kind)
    for s in seen:
        replayed = s.by != old_host and s.time_s < t_fault
        done = s.first_seen if replayed else s.time_s + s.total_delay
        start = min(s.time_s, times.get(s.batch - 1, s.time_s) + iv)
        kind = "replayed" if replayed else ("gap" if start < s.time_s - iv / 2 else "")
        rows.append((s.batch, s.time_s, done, done - start, s.total_delay, kind))
    pre = [d for _, t, done, d, _, _ in rows if done < t_fault and t >= t_fault - args.steady]
    normal = c.median(pre)
    after = [r for r in rows if r[2] >= t_fault and r[1] <= t_end]
    excess = max((r[3] - normal for r in after), default=float("nan"))
    ok = [r[3] <= normal + TOLERANCE_S for r in after]
    to_normal = float("nan")
    for i in range(len(after)):
        if all(ok[i:]):
            to_normal = after[i][2] - t_fault if not all(ok) else 0.0
            break
    # the first batch sealed after the fault: the new leader's
    first_new = next((r[2] - t_fault for r in rows if r[1] > t_fault), float("nan"))
    return {
        "rows": rows,
        "normal": normal,
        "pre_batches": len(pre),
        "worst": max((r[3] for r in after), default=float("nan")),
        "worst_status": max((r[4] for r in after), default=float("nan")),
        "excess": excess,
        "abnormal": ok.count(False),
        "to_normal": to_normal,
        "replayed": sum(1 for r in rows if r[5] == "replayed"),
        "first_new_s": first_new,
    }


# --------------------------------------------------------------------------- report
def _s(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f} s"


def passed(r: dict[str, Any]) -> bool:
    """Exact output, and a paused leader that stepped down with its exit code."""
    return bool(r["exact"]) and (r["fault"] != "stop" or r.get("old_exit") == LOST_LEADERSHIP)


def report(runs: list[dict[str, Any]], rate: float, source: str, args: argparse.Namespace) -> str:
    cmd = f".venv/bin/python -m bench.failover --faults {args.faults}"
    if args.rate:
        cmd += f" --rate {args.rate:g}"
    elif args.max_rate:
        cmd += f" --max-rate {args.max_rate:g}"
    lease = os.environ.get("DSTREAM_LEASE_SECONDS", "2") + " s"
    if "DSTREAM_LEASE_SECONDS" not in os.environ:
        lease += " (the default)"
    lines = [
        "## Failover to a standby coordinator (kill -9, SIGSTOP)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {c.machine_line()}.",
        "",
        f"Topology: two `dstream coordinator` processes of `{APP}` (running count per url, "
        f"`to_kafka`) at {HOSTS[0]} (leads) and {HOSTS[1]} (standby) on one RPC port, "
        f"{args.workers} `dstream worker` processes, each process its own; all take both "
        f"addresses in `DSTREAM_COORDINATOR`. {args.interval:g} s batches, lease {lease}, "
        f"{args.partitions} input partitions; input: `dstream produce` at {rate:,.0f} "
        f"records/s ({source}) for {args.warmup + args.steady + args.after:g} s, the fault "
        f"{args.warmup + args.steady:g} s after it starts. `stop`: SIGSTOP, SIGCONT "
        f"{args.resume_after:g} s after the standby leads. Standby leads = fault to its "
        f"first `/readyz` 200 (polled every {READY_POLL_S * 1000:.0f} ms). Batch delay = "
        "completion - batch time (`total_delay` of `/api/status`, polled on both "
        "coordinators every 0.1 s), counted for the new leader's first batch from the end "
        "of the last batch the old leader logged (it holds every record since) and for "
        "replayed batches from their original batch time; normal = median batch delay "
        f"over the {args.steady:g} s before the fault; worst beyond normal = largest "
        "(delay - normal) of the batches completed after the fault; normal again = fault "
        "to the completion of the first batch from which on every batch (while the input "
        f"flows) is within normal + {TOLERANCE_S:g} s. Workers rejoined = fault to the last "
        "worker joining the new leader (its log); fenced output tasks = tasks of the new "
        "leader that failed on a fenced Kafka transaction and ran again. Exact = final count "
        "per url in the "
        "output topic (`read_committed`) equals the input topic's records per url, no "
        "(url, batch) written twice, counts strictly increasing.",
        "",
        "| fault | standby leads (target <= 3 s) | workers rejoined | first new batch done "
        "| normal | worst batch delay | worst beyond normal (target <= 5 s) "
        "| normal again (target <= 10 s) | batches over normal + 0.5 s | replayed "
        "| fenced output tasks | worst `total_delay` in the status | old leader | records "
        "| exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r["fault"] == "stop":
            oldl = f"exit {r['old_exit']}, {r['refused']} actions refused"
        else:
            oldl = f"killed ({r['old_exit']})"
        lines.append(
            f"| {FAULTS[r['fault']]} | {_s(r['leads_s'])} "
            f"({c.verdict(r['leads_s'], TARGET_LEADS_S, False)}) | {_s(r['rejoined_s'])} "
            f"| {_s(r['first_new_s'])} | {r['normal'] * 1000:.0f} ms | {_s(r['worst'])} "
            f"| {_s(r['excess'])} ({c.verdict(r['excess'], TARGET_EXCESS_S, False)}) "
            f"| {_s(r['to_normal'], 1)} ({c.verdict(r['to_normal'], TARGET_NORMAL_S, False)}) "
            f"| {r['abnormal']} | {r['replayed']} | {r['fenced_tasks']} "
            f"| {_s(r['worst_status'])} | {oldl} | {r['records']:,} | {r['exact']} |"
        )
    lines += [
        "",
        "Batch delay (s) by batch time relative to the fault, from 2 s before it until the "
        "input ends (`r` = replayed by the new leader, `g` = the new leader's first batch, "
        "holding the gap):",
        "",
    ]
    for r in runs:
        row = [
            f"`{t - r['t_fault']:+.1f}`{MARK.get(k, '')} {d:.2f}"
            for _, t, _, d, _, k in r["rows"]
            if r["t_fault"] - 2 <= t <= r["t_end"]
        ]
        lines.append(f"- {r['fault']}: " + " ".join(row))
    ok = {
        "leads": all(r["leads_s"] <= TARGET_LEADS_S for r in runs),
        "excess": all(r["excess"] <= TARGET_EXCESS_S for r in runs),
        "normal": all(r["to_normal"] <= TARGET_NORMAL_S for r in runs),
    }
    word = {True: "met", False: "missed"}
    lines += [
        "",
        f"Targets: standby leads within 3 s: **{word[ok['leads']]}**; no batch more than 5 s "
        f"beyond normal: **{word[ok['excess']]}**; normal again within 10 s: "
        f"**{word[ok['normal']]}**; output exact in every run: "
        f"**{all(r['exact'] for r in runs)}**; the paused leader exits with 4: "
        f"**{all(r.get('old_exit') == LOST_LEADERSHIP for r in runs if r['fault'] == 'stop')}**.",
        "",
        "![failover](failover.png)",
        "",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """``failover.png``: batch delay and status ``total_delay`` by batch time, per run."""
    plt = c.plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), sharey=True)
    if len(runs) == 1:
        axes = [axes]
    for ax, r in zip(axes, runs, strict=True):
        # no line across the batches no coordinator sealed (NaN breaks it)
        xs: list[float] = []
        ys: list[float] = []
        status: list[float] = []
        for _, t, _, d, total, _ in r["rows"]:
            if xs and t - r["t_fault"] - xs[-1] > 1.5 * args.interval:
                xs.append(float("nan"))
                ys.append(float("nan"))
                status.append(float("nan"))
            xs.append(t - r["t_fault"])
            ys.append(d)
            status.append(total)
        ax.plot(xs, ys, marker=".", lw=1, label="batch delay")
        ax.plot(
            xs,
            status,
            marker="x",
            lw=0,
            ms=4,
            color="grey",
            label="status total_delay",
        )
        ax.axvline(0, color="red", ls="--", label=r["fault"])
        ax.axvline(r["leads_s"], color="green", ls=":", label="standby leads")
        ax.axhline(r["normal"] + TOLERANCE_S, color="grey", ls=":", label="normal + 0.5 s")
        ax.set_title(FAULTS[r["fault"]])
        ax.set_xlabel("batch time - fault time (s)")
        ax.set_xlim(-args.steady, args.after + 3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("batch delay (s)")
    fig.tight_layout()
    out = c.RESULTS / "failover.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out.relative_to(c.ROOT)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--faults", default="kill,stop", help="kill, stop or both")
    c.add_load_args(p)
    p.set_defaults(warmup=5.0)
    p.add_argument("--steady", type=float, default=10.0)
    p.add_argument("--after", type=float, default=20.0)
    p.add_argument("--resume-after", type=float, default=2.0)
    p.add_argument("--catch-up", type=float, default=60.0)
    p.add_argument("--fragment", default="failover.md")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    if unknown := set(faults) - set(FAULTS):
        p.error(f"unknown faults {sorted(unknown)}: choose from {sorted(FAULTS)}")
    c.print_machine()
    rate, source = c.run_rate(args.rate, args.level, args.max_rate)
    runs = [one_run(args, rate, f) for f in faults]
    text = report(runs, rate, source, args)
    print(text)
    c.write_fragment(args.fragment, text)
    if not args.no_plot:
        plot(runs, args)
    return 0 if all(passed(r) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
