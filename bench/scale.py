"""Coordinator scale: the real scheduling logic with simulated workers that finish at once.

The job is the page-view pipeline's 3-stage shape (``kafka_stream -> map -> reduce_by_key ->
running_reduce -> to_kafka``) compiled by the real :class:`engine.plan.Plan`, scheduled by
the real :class:`engine.scheduler.Scheduler`, driven through the instruction loop the fleet
uses (:func:`engine.dispatch.apply`, as ``ops/coordinator/dispatch.py`` does): per
batch, every input block is reported with its two holders (the receiver's worker and its
replica peer), then ``add_batch`` and ``tick``; every finished task is reported with
``task_finished`` (output tasks first ask ``request_commit``) and followed by a ``tick``
(the dispatcher's ``task_done`` calls ``dispatch`` after each report). Per launch the
shell's work is also done (block locations, and the ``Launch`` message encoded with msgpack
as the I/O thread does before it writes to the socket). Workers are
in-process stand-ins: a launched task finishes immediately, so every second measured is the
coordinator's own CPU time.

Sizes: W workers, 4 input partitions each (4W map tasks), ``--reduce-per-worker`` reduce
partitions per worker for both keyed operators (default 1, so W each), ``task_slots`` 2.
As the coordinator runs it (``ops/coordinator/leader.py``): input blocks are retained for
``2 x 10 + 2`` batches and every state partition is checkpointed every 10 batches.

Every figure is the coordinator thread's CPU time (``time.thread_time``; on an idle
machine, the wall time). Figures per W: scheduling delay of a batch = time from its blocks
being reported to every one of its tasks launched and finished through the scheduler
(batch complete), p50/p99 over ``--batches`` batches after warm-up, and the part of it
spent in ``add_batch`` (taking the tasks planned ahead); the time planning the batch ahead
(:meth:`engine.scheduler.Scheduler.prepare`, :meth:`engine.plan.Plan.tasks_for_batch`),
which the batch clock does after cutting the batch before, in the interval's idle time,
outside the lock, so it is in no batch's delay; the first-launch delay (until the first
chunk of launches is handed out: the dispatcher sends launches in chunks of
``LAUNCH_CHUNK`` as they are placed); the cost per task (delay / tasks); tasks/s sustained =
tasks per second of scheduler CPU. A 1 s batch interval is sustainable while
the delay stays < 1 s.

Recovery (``--recovery-workers``): in the middle of a batch (map stage done, reduces
running), one worker is lost; the figure is the time of ``remove_worker`` plus the tick
that follows, which re-launches the lost worker's attempts and map outputs and plans the
rebuild of the state partition it held (lineage back to the checkpoint), with the part of
it spent re-planning old tasks (``Plan.task_for``) apart.

    .venv/bin/python -m bench.scale [--workers 50,100,200,400,1000] [--batches 20]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import operator
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bench import _common as c
from engine import StreamingContext
from engine.codec import pack
from engine.dispatch import InstructionHandler, apply, tick_once
from engine.plan import Plan
from engine.scheduler import (
    BatchCompleted,
    LaunchTask,
    ReadInput,
    Replicate,
    Scheduler,
    tune_gc,
)
from ops.protocol import Launch

#: the clock of every figure: this thread's CPU time, so that other work on a shared
#: machine does not show as scheduler time (the simulated fleet is one thread)
cpu = time.thread_time
T = TypeVar("T")
SLOTS = 2
PARTS_PER_WORKER = 4
#: the issue #7 target (200 workers) and the issue #16 targets (1,000 workers)
TARGETS_P99_S = {200: 0.100, 1000: 0.100}
TARGET_WORKERS = 1000
TARGET_P99_S = 0.100
TARGET_FIRST_S = 0.020
TARGET_RECOVERY_S = 0.050
#: as the coordinator runs the scheduler (ops/coordinator/leader.py, default settings)
CHECKPOINT_EVERY = 10
RETAIN_INPUTS = 2 * CHECKPOINT_EVERY + 2


def build_plan(workers: int, reduce_per_worker: int) -> tuple[Plan, int]:
    ssc = StreamingContext(batch_interval=1.0, num_partitions=workers * reduce_per_worker)
    views = ssc.kafka_stream("pageviews", value_format="json")
    counts = views.map(lambda e: (e["url"], 1)).reduce_by_key(operator.add)
    counts.running_reduce(operator.add).to_kafka("pageview-counts")
    src = next(n.id for n in ssc.nodes if n.kind == "source")
    return Plan(ssc.nodes, {src: workers * PARTS_PER_WORKER}), src


class _SimulatedWorkers(InstructionHandler):
    """Launched tasks queue up to "run"; the batch is done when the scheduler says so."""

    def __init__(self, sched: Scheduler, running: collections.deque[LaunchTask]) -> None:
        self.sched = sched
        self.running = running
        self.done = False
        self.launched = 0

    def replicate(self, ins: Replicate) -> None:
        self.sched.block_added(ins.block_id, ins.target, 100_000)

    def launch(self, ins: LaunchTask) -> None:
        # the shell's per-launch work (ops/coordinator/dispatch.py:Dispatcher.launch): the
        # locations, under the lock, then the message's encoding, in the I/O thread that
        # sends it (on the same CPU); the socket write itself is left out
        locations = self.sched.locations_of(ins.spec)
        pack(Launch(ins.spec, ins.attempt, locations, {}, 0).to_wire())
        self.running.append(ins)
        self.launched += 1

    def batch_completed(self, ins: BatchCompleted) -> None:
        self.done = True


class BatchTooSlow(Exception):
    """A batch did not complete within the time cap."""

    def __init__(self, seconds: float, finished: int, tasks: int, first: float) -> None:
        super().__init__(f"{finished}/{tasks} tasks finished after {seconds:.0f} s")
        self.first = first
        self.seconds = seconds
        self.finished = finished
        self.tasks = tasks


class SimCoordinator:
    """The coordinator's use of the scheduler, minus sockets; workers finish at once."""

    def __init__(self, workers: int, reduce_per_worker: int) -> None:
        self.plan, self.src = build_plan(workers, reduce_per_worker)
        self.sched = Scheduler(self.plan, 0, speculation=True, retain_inputs=RETAIN_INPUTS)
        self.stateful = [
            (n.id, p) for n in self.plan.stateful_nodes() for p in range(self.plan.nparts[n.id])
        ]
        self.workers = [f"10.0.{i // 250}.{i % 250}:7000" for i in range(workers)]
        for w in self.workers:
            self.sched.add_worker(w, SLOTS)
        self.nparts = workers * PARTS_PER_WORKER
        self.clock = 0.0
        self.tasks_done = 0
        self.plan_s = 0.0
        #: seconds the last ``Scheduler.prepare`` (planning the next batch ahead) took
        self.ahead_s = 0.0
        #: when the current batch's first chunk of launches was handed out
        self.first_chunk: float | None = None
        #: seconds spent planning so far (Plan.tasks_for_batch, and Plan.task_for re-planning)
        self.planning = 0.0
        self.plan.tasks_for_batch = self._timed(self.plan.tasks_for_batch)  # type: ignore[method-assign]
        self.plan.task_for = self._timed(self.plan.task_for)  # type: ignore[method-assign]
        #: (seconds, of which re-planning old batches, launches, tasks re-planned) per loss
        self.recoveries: list[tuple[float, float, int, int]] = []

    def _timed(self, fn: Callable[..., T]) -> Callable[..., T]:
        """*fn*, its CPU time added to ``planning``."""

        def timed(*args: Any) -> T:
            t0 = cpu()
            try:
                return fn(*args)
            finally:
                self.planning += cpu() - t0

        return timed

    def checkpoint(self, b: int) -> None:
        """Every CHECKPOINT_EVERY batches, all state partitions are checkpointed at *b*."""
        if (b + 1) % CHECKPOINT_EVERY == 0:
            for node, part in self.stateful:
                self.sched.set_checkpoint(node, part, b)

    def lose(self, victim: str, sim: _SimulatedWorkers) -> None:
        """Lose *victim*: time ``remove_worker`` and the tick that plans the recovery."""
        launched0 = sim.launched
        planning0 = self.planning
        recomputed0 = self.sched.stats.recomputed
        t0 = cpu()
        out = self.sched.remove_worker(victim)
        out += self.sched.tick(self.now())
        dt = cpu() - t0
        self.workers.remove(victim)
        self._apply(out, sim)
        for i in out:
            if isinstance(i, ReadInput):  # re-read from Kafka by a live worker
                self.sched.block_added(i.block_id, self.workers[0], 100_000)
        self.recoveries.append(
            (
                dt,
                self.planning - planning0,
                sim.launched - launched0,
                self.sched.stats.recomputed - recomputed0,
            )
        )

    def now(self) -> float:
        return self.clock + cpu()

    def _apply(self, ins: list[Any], sim: _SimulatedWorkers) -> bool:
        apply(ins, sim)
        return sim.done

    def _dispatch(
        self, sim: _SimulatedWorkers, first: collections.deque[LaunchTask] | None = None
    ) -> bool:
        """Tick and apply in chunks, as the coordinator's dispatcher does.

        With *first* (the batch's launches so far), the time of the first chunk's launches
        is the batch's first-launch delay (``first_chunk``).
        """
        while True:
            more = tick_once(self.sched, sim, self.now())
            if first is not None and self.first_chunk is None and first:
                self.first_chunk = cpu()
            if not more:
                return sim.done

    def run_batch(
        self, b: int, cap: float = float("inf"), lose_after: int | None = None
    ) -> tuple[float, float, int]:
        """One batch end to end; returns (delay to complete, delay to first launch, tasks).

        With *lose_after*, the worker of the next task to finish is lost after that many
        of the batch's tasks finished (see :meth:`lose`). ``plan_s`` is set to the time
        ``add_batch`` took (planning the batch's tasks).

        Raises:
            BatchTooSlow: the batch was not complete after *cap* seconds.

        """
        t0 = cpu()
        nw = len(self.workers)
        for p in range(self.nparts):
            owner = p % nw
            bid = f"in/{self.src}/{b}/{p}"
            self.sched.block_added(bid, self.workers[owner], 100_000)
            self.sched.block_added(bid, self.workers[(owner + 1) % nw], 100_000)
        tp = cpu()
        specs = self.sched.add_batch(b, self.now())
        self.plan_s = cpu() - tp
        running: collections.deque[LaunchTask] = collections.deque()
        sim = _SimulatedWorkers(self.sched, running)
        done0 = self.tasks_done
        first_launch: float | None = None
        self.first_chunk = None
        done = self._dispatch(sim, running)
        while running and not done:
            if cpu() - t0 > cap:
                raise BatchTooSlow(
                    cpu() - t0,
                    self.tasks_done - done0,
                    len(specs),
                    first_launch or 0.0,
                )
            if first_launch is None:
                first_launch = (self.first_chunk or cpu()) - t0
            if lose_after is not None and self.tasks_done - done0 == lose_after:
                lose_after = None
                self.lose(running[0].worker, sim)
                continue
            ins = running.popleft()
            if ins.worker not in self.sched.slots:
                continue  # an attempt on the lost worker: it never reports
            if ins.spec.kind == "output":
                self.sched.request_commit(ins.spec.id, ins.attempt)
            out = self.sched.task_finished(ins.spec.id, ins.attempt, ins.worker, self.now(), 1000)
            self.tasks_done += 1
            done = self._apply(out, sim) or done
            done = self._dispatch(sim) or done
        if not done:
            msg = f"batch {b} did not complete ({len(self.sched.batches)} pending)"
            raise RuntimeError(msg)
        elapsed = cpu() - t0
        # as the batch clock does after cutting a batch: the next one is planned in the
        # interval's idle time, outside the lock (not part of any batch's delay)
        ta = cpu()
        self.sched.prepare(b + 1)
        self.ahead_s = cpu() - ta
        return elapsed, first_launch or 0.0, len(specs)


def measure(
    workers: int, batches: int, warmup: int, reduce_per_worker: int, budget: float
) -> dict[str, Any]:
    sim = SimCoordinator(workers, reduce_per_worker)
    tune_gc()  # as run_coordinator does
    delays: list[float] = []
    firsts: list[float] = []
    plans: list[float] = []
    aheads: list[float] = []
    ntasks = 0
    busy = 0.0
    t_start = time.perf_counter()
    for b in range(warmup + batches):
        try:
            d, f, n = sim.run_batch(b, cap=budget)
        except BatchTooSlow as e:
            # one batch alone blew the budget: report a lower bound and the partial rate
            return {
                "workers": workers,
                "tasks_per_batch": e.tasks,
                "batches": 0,
                "p50": e.seconds,
                "p99": e.seconds,
                "first_p50": e.first,
                "first_p99": e.first,
                "plan_p50": sim.plan_s,
                "ahead_p50": sim.ahead_s,
                "sched_p99": e.seconds - sim.plan_s,
                "tasks_per_s": e.finished / e.seconds,
                "delays": [],
                "incomplete": f"batch {b}: {e}",
            }
        sim.checkpoint(b)
        sim.clock += 1.0  # 1 s batches: the next batch's blocks arrive a second later
        if b >= warmup:
            delays.append(d)
            firsts.append(f)
            plans.append(sim.plan_s)
            aheads.append(sim.ahead_s)
            ntasks += n
            busy += d
        if time.perf_counter() - t_start > budget and len(delays) >= 3:
            break
    n_per = ntasks // max(1, len(delays))
    sched = [d - p for d, p in zip(delays, plans, strict=True)]
    return {
        "workers": workers,
        "tasks_per_batch": n_per,
        "batches": len(delays),
        "p50": c.pct(delays, 0.5),
        "p99": c.pct(delays, 0.99),
        "first_p50": c.pct(firsts, 0.5),
        "first_p99": c.pct(firsts, 0.99),
        "plan_p50": c.pct(plans, 0.5),
        "ahead_p50": c.pct(aheads, 0.5),
        "sched_p50": c.pct(sched, 0.5),
        "sched_p99": c.pct(sched, 0.99),
        "us_per_task": c.pct(delays, 0.5) / n_per * 1e6 if n_per else float("nan"),
        "sched_us_per_task": c.pct(sched, 0.5) / n_per * 1e6 if n_per else float("nan"),
        "tasks_per_s": ntasks / busy if busy else float("nan"),
        "delays": delays,
        "incomplete": "",
    }


def measure_recovery(workers: int, trials: int, reduce_per_worker: int) -> dict[str, Any]:
    """Lose one worker in the middle of a batch, *trials* times (one batch each).

    The loss comes after the map stage and half of the first reduce stage finished. The
    lost worker holds map outputs, running attempts and (as every worker does here, one
    partition each) a state partition the batch still reads: the tick after
    ``remove_worker`` re-launches its attempts and map outputs and plans the state
    partition's rebuild from its checkpoint (lineage: the batches since the checkpoint).
    """
    sim = SimCoordinator(workers, reduce_per_worker)
    tune_gc()
    maps = workers * PARTS_PER_WORKER
    b = 0
    for b in range(3):
        sim.run_batch(b)
        sim.checkpoint(b)
        sim.clock += 1.0
    for _ in range(trials):
        b += 1
        sim.run_batch(b, lose_after=maps + workers * reduce_per_worker // 2)
        sim.checkpoint(b)
        sim.clock += 1.0
    rec = sim.recoveries
    return {
        "workers": workers,
        "trials": len(rec),
        "p50": c.pct([r[0] for r in rec], 0.5),
        "max": max(r[0] for r in rec),
        "replan_p50": c.pct([r[1] for r in rec], 0.5),
        "rest_max": max(r[0] - r[1] for r in rec),
        "launches": c.median([float(r[2]) for r in rec]),
        "recomputed": c.median([float(r[3]) for r in rec]),
    }


def profile(workers: int, reduce_per_worker: int, batches: int = 1) -> tuple[str, str]:
    """pyinstrument tree and cProfile self-time table of a few batches at *workers*."""
    from pyinstrument import Profiler

    sim = SimCoordinator(workers, reduce_per_worker)
    sim.run_batch(0)
    prof = Profiler(interval=0.0005)
    prof.start()
    for b in range(1, 1 + batches):
        sim.run_batch(b)
    prof.stop()
    tree = prof.output_text(unicode=False, color=False, show_all=False)
    (c.RESULTS / "scale-profile.txt").write_text(tree)
    cp = cProfile.Profile()
    cp.enable()
    for b in range(1 + batches, 1 + 2 * batches):
        sim.run_batch(b)
    cp.disable()
    s = io.StringIO()
    stats = pstats.Stats(cp, stream=s)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    lines = [
        "| function (self time) | % of scheduler CPU | calls |",
        "|---|---|---|",
    ]
    for (fname, line, func), (_cc, nc, tt, _ct, _callers) in rows[:12]:
        where = fname.replace(str(c.ROOT) + "/", "")
        if "site-packages" in where or where.startswith("<"):
            where = where.rsplit("/", 1)[-1]
        lines.append(f"| `{where}:{line}:{func}` | {tt / total * 100:.1f}% | {nc:,} |")
    return tree, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", default="50,100,200,400,1000")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reduce-per-worker", type=int, default=1)
    p.add_argument("--budget", type=float, default=60.0, help="seconds per size, at most")
    p.add_argument(
        "--profile-workers", type=int, default=1000, help="size profiled (one batch each tool)"
    )
    p.add_argument("--recovery-workers", type=int, default=1000, help="0: no recovery run")
    p.add_argument("--recovery-trials", type=int, default=5)
    p.add_argument("--fragment", default="scale.md")
    args = p.parse_args(argv)
    c.print_machine()
    rows = []
    for w in [int(x) for x in args.workers.split(",") if x]:
        r = measure(w, args.batches, args.warmup, args.reduce_per_worker, args.budget)
        rows.append(r)
        print(
            f"{w} workers: {r['tasks_per_batch']} tasks/batch, delay p50 {r['p50'] * 1000:.0f} ms "
            f"p99 {r['p99'] * 1000:.0f} ms (add_batch p50 {r['plan_p50'] * 1000:.1f} ms, planned "
            f"ahead p50 {r['ahead_p50'] * 1000:.0f} ms, "
            f"scheduling p99 {r['sched_p99'] * 1000:.0f} ms; first launch p50 "
            f"{r['first_p50'] * 1000:.1f} ms), {r['tasks_per_s']:,.0f} tasks/s over "
            f"{r['batches']} batches "
            f"{r['incomplete'] and '(INCOMPLETE: ' + r['incomplete'] + ')'}",
            flush=True,
        )
    rec = None
    if args.recovery_workers:
        rec = measure_recovery(args.recovery_workers, args.recovery_trials, args.reduce_per_worker)
        print(
            f"recovery at {rec['workers']} workers: a mid-batch loss planned in p50 "
            f"{rec['p50'] * 1000:.1f} ms (max {rec['max'] * 1000:.1f} ms; re-planning old "
            f"batches p50 {rec['replan_p50'] * 1000:.1f} ms, the rest at most "
            f"{rec['rest_max'] * 1000:.1f} ms; {rec['launches']:.0f} launches, "
            f"{rec['recomputed']:.0f} tasks re-planned)",
            flush=True,
        )
    _tree, table = profile(args.profile_workers, args.reduce_per_worker)
    print(table)
    text = report(args, rows, rec, table)
    c.write_fragment(args.fragment, text)
    plot(rows)
    return 0


def report(args: argparse.Namespace, rows: list[dict], rec: dict | None, table: str) -> str:
    """The markdown fragment: the curve, the targets' verdicts, recovery and the profile."""
    lines = [
        "## Coordinator scale (simulated workers, real Plan + Scheduler)",
        "",
        f"Command: `.venv/bin/python -m bench.scale --workers {args.workers} --batches "
        f"{args.batches} --reduce-per-worker {args.reduce_per_worker}`",
        "",
        f"Job: map -> reduce_by_key -> running_reduce -> to_kafka; W workers x "
        f"{PARTS_PER_WORKER} input partitions, {args.reduce_per_worker} reduce partition(s) "
        f"per worker per keyed operator, {SLOTS} slots per worker, 1 s batches, every block "
        f"on two holders, speculation on, inputs retained {RETAIN_INPUTS} batches and state "
        f"checkpointed every {CHECKPOINT_EVERY} (the coordinator's defaults). Stand-in "
        "workers finish each task at once, so the delay is the coordinator's own CPU time "
        "(the shell's per-launch location lookup and the `Launch` message's msgpack encoding "
        "included; sockets excluded). *planned ahead* is `Scheduler.prepare` (the plan's "
        "task list of the batch), which the batch clock runs after cutting the batch before, "
        "in the interval's idle time and outside the lock, as this benchmark does: it is in no "
        "batch's delay. *add_batch* is what is left of planning in the delay (taking the "
        "tasks planned ahead); *scheduling* is the rest of the delay.",
        "",
        "| workers | tasks/batch | delay p50 | delay p99 | planned ahead p50 | add_batch p50 "
        "| scheduling p99 | first launch p50 | per task (all) | per task (scheduling) "
        "| 1 s batches sustainable |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gt = "> " if r["incomplete"] else ""
        lines.append(
            f"| {r['workers']:,} | {r['tasks_per_batch']:,} | {gt}{r['p50'] * 1000:,.0f} ms "
            f"| {gt}{r['p99'] * 1000:,.0f} ms | {r['ahead_p50'] * 1000:,.0f} ms "
            f"| {r['plan_p50'] * 1000:,.1f} ms "
            f"| {r['sched_p99'] * 1000:,.0f} ms | {r['first_p50'] * 1000:,.1f} ms "
            f"| {r.get('us_per_task', float('nan')):,.1f} us "
            f"| {r.get('sched_us_per_task', float('nan')):,.1f} us "
            f"| {'yes' if r['p99'] < 1.0 else 'no'} |"
        )
    slow = [r for r in rows if r["incomplete"]]
    if slow:
        lines += [""] + [
            f"- {r['workers']} workers: stopped after the {args.budget:g} s cap "
            f"({r['incomplete']}); the delay shown is a lower bound."
            for r in slow
        ]
    lines.append("")
    for w, target in TARGETS_P99_S.items():
        r = next((x for x in rows if x["workers"] == w), None)
        if r is None:
            continue
        lines.append(
            f"- Target: {w:,} workers x {PARTS_PER_WORKER} partitions, a whole batch p99 <= "
            f"{target * 1000:.0f} ms: p99 = {r['p99'] * 1000:,.0f} ms, "
            f"**{c.verdict(r['p99'], target, False)}** (of which add_batch p50 "
            f"{r['plan_p50'] * 1000:,.1f} ms, the batch planned ahead in p50 "
            f"{r['ahead_p50'] * 1000:,.0f} ms; scheduling alone p99 "
            f"{r['sched_p99'] * 1000:,.0f} ms: {c.verdict(r['sched_p99'], target, False)})."
        )
        if w == TARGET_WORKERS:
            lines.append(
                f"- Target: {w:,} workers, first task launched <= {TARGET_FIRST_S * 1000:.0f} ms:"
                f" p50 = {r['first_p50'] * 1000:,.1f} ms, "
                f"**{c.verdict(r['first_p50'], TARGET_FIRST_S, False)}**."
            )
    if rec is not None:
        lines += [
            f"- Target: one of {rec['workers']:,} workers lost mid-batch, recovery planned "
            f"(`remove_worker` + the next tick) <= {TARGET_RECOVERY_S * 1000:.0f} ms: p50 "
            f"{rec['p50'] * 1000:,.1f} ms, max {rec['max'] * 1000:,.1f} ms over "
            f"{rec['trials']} losses, **{c.verdict(rec['max'], TARGET_RECOVERY_S, False)}**. "
            f"Of it, re-planning the tasks since the checkpoint, one by one (`Plan.task_for`, "
            f"{rec['recomputed']:,.0f} tasks re-planned for the lost state partition's "
            f"lineage): p50 {rec['replan_p50'] * 1000:,.1f} ms; the scheduler's own part at "
            f"most {rec['rest_max'] * 1000:,.1f} ms "
            f"({c.verdict(rec['rest_max'], TARGET_RECOVERY_S, False)}); "
            f"{rec['launches']:,.0f} tasks launched by that tick.",
        ]
    lines += [
        "",
        "![scale](scale.png)",
        "",
        f"Profile of a batch at {args.profile_workers:,} workers (cProfile self time over "
        "one batch; pyinstrument call tree of another batch in "
        "`bench/results/scale-profile.txt`):",
        "",
        table,
        "",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> None:
    plt = c.plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in rows if not r["incomplete"]]
    ws = [r["workers"] for r in rows]
    ax[0].plot(ws, [r["p50"] * 1000 for r in rows], "o-", label="whole batch p50")
    ax[0].plot(ws, [r["p99"] * 1000 for r in rows], "s-", label="whole batch p99")
    ax[0].plot(ws, [r["sched_p99"] * 1000 for r in rows], "^-", label="scheduling p99")
    ax[0].plot(ws, [r["ahead_p50"] * 1000 for r in rows], "v--", label="planned ahead p50")
    ax[0].axhline(TARGET_P99_S * 1000, color="red", ls=":", label="target p99")
    ax[0].set_xscale("log")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("simulated workers (4 input partitions each)")
    ax[0].set_ylabel("ms per batch")
    ax[0].legend(fontsize=8)
    ax[1].plot(ws, [r["us_per_task"] for r in rows], "o-", label="whole batch")
    ax[1].plot(ws, [r["sched_us_per_task"] for r in rows], "^-", label="scheduling only")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("simulated workers")
    ax[1].set_ylabel("coordinator CPU per task (us, p50 batch)")
    ax[1].set_ylim(bottom=0)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    out = c.RESULTS / "scale.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out.relative_to(c.ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
