"""The task scheduler: a pure state machine shared by the in-process runner and the fleet.

It takes events (a batch's input blocks are ready, a task finished or failed, a worker
joined or was lost, the clock ticked) and returns instructions (launch this task attempt on
that worker, free these blocks, a batch completed). It does no I/O and reads no clock: the
caller passes ``now``. Lineage lives here: a needed block with no live holder is recomputed
by re-running the task that produced it (or, for an input block, re-read from Kafka).

Public: its callers are :class:`engine.local.LocalRunner`, the coordinator (``ops``) and the
scale benchmark; they feed it events and carry out its instructions (:class:`LaunchTask`,
:class:`ReadInput`, :class:`FreeBlocks`, :class:`BatchCompleted`, ...).
"""

from __future__ import annotations

import statistics
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.plan import Plan, TaskSpec, block_batch

PENDING, RUNNING, DONE = "pending", "running", "done"
#: How often stragglers are looked for: often enough to react within a fraction of a
#: 100 ms batch, rarely enough that it costs nothing next to task bookkeeping.
SPECULATION_EVERY_S = 0.02
#: How long a worker caught straggling is kept out of new placements (while others are free).
SUSPECT_SECONDS = 5.0
#: Tasks with more inputs than this are placed by free slots only (no locality scoring).
LOCALITY_MAX_INPUTS = 32
#: Pseudo-holder of state blocks that can be loaded from the checkpoint store.
CHECKPOINT = "@checkpoint"


@dataclass(frozen=True)
class LaunchTask:
    """Run attempt *attempt* of *spec* on *worker*."""

    spec: TaskSpec
    worker: str
    attempt: int
    speculative: bool = False


@dataclass(frozen=True)
class CancelTask:
    """Another attempt finished first: the attempt's result is to be discarded."""

    task_id: str
    worker: str
    attempt: int


@dataclass(frozen=True)
class FreeBlocks:
    """*worker* may drop these blocks: no unfinished batch, window or state reads them."""

    worker: str
    block_ids: tuple[str, ...]


@dataclass(frozen=True)
class Replicate:
    """Copy *block_id* from *source* to *target*: it lost its second holder."""

    block_id: str
    source: str
    target: str


@dataclass(frozen=True)
class ReadInput:
    """Input block *block_id* is needed but has no live holder: re-read it from Kafka."""

    block_id: str


@dataclass(frozen=True)
class BatchCompleted:
    """Every output of *batch* committed."""

    batch: int


Instruction = LaunchTask | CancelTask | FreeBlocks | BatchCompleted | ReadInput | Replicate


@dataclass
class _Task:
    spec: TaskSpec
    status: str = PENDING
    attempts: dict[int, tuple[str, float]] = field(default_factory=dict)  # attempt -> (w, t0)
    next_attempt: int = 0
    duration: float = 0.0
    committer: int | None = None
    speculated: bool = False
    speculative_attempts: set[int] = field(default_factory=set)
    failures: int = 0
    not_before: float = 0.0
    blocked: bool = False
    #: inputs still awaited while parked (the task wakes when it reaches 0)
    awaiting: int = 0
    #: the scheduler's loss count when the task was parked: if no block was lost since,
    #: a task woken with nothing awaited is known ready without scanning its inputs again
    parked_at_loss: int = -1


@dataclass
class _Batch:
    tasks: list[str]
    outputs_left: set[str]
    start: float
    first_launch: float | None = None


@dataclass
class SchedulerStats:
    """Counters the shell exports as metrics."""

    launched: int = 0
    retried: int = 0
    speculative_launched: int = 0
    speculative_won: int = 0
    recomputed: int = 0
    #: input blocks asked to be re-read from Kafka (no holder left)
    reread: int = 0


def tune_gc() -> None:
    """Garbage-collector settings for a process that runs the scheduler (the coordinator).

    A batch allocates one task object per task and one input tuple per (map, reduce) pair
    (160,000 at 200 workers), all alive until the batch completes: with the default
    thresholds the collector runs every 700 allocations and walks them again and again,
    which shows as the scheduler's tail latency. Objects alive at start-up (the app, the
    plan, modules) are frozen out of collection, and young collections run 100x less often.
    Reference counting still frees everything at once; only cycles wait longer.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(70_000, 20, 20)


class _Free:
    """Free slots per live worker, read from ``slots`` and ``busy`` when asked.

    A tick used to copy this into a dict (O(workers) per tick, and a tick follows every
    finished task); launching a task bumps ``busy``, so the view stays current by itself.
    """

    __slots__ = ("busy", "slots")

    def __init__(self, slots: dict[str, int], busy: dict[str, int]) -> None:
        self.slots = slots
        self.busy = busy

    def get(self, w: str, default: int = 0) -> int:
        n = self.slots.get(w)
        return default if n is None else n - self.busy.get(w, 0)

    def __getitem__(self, w: str) -> int:
        return self.slots[w] - self.busy.get(w, 0)

    def items(self) -> Iterable[tuple[str, int]]:
        busy = self.busy
        return ((w, n - busy.get(w, 0)) for w, n in self.slots.items())

    def any(self) -> bool:
        busy = self.busy
        return any(n > busy.get(w, 0) for w, n in self.slots.items())


class Scheduler:
    """Locality-aware task scheduling with lineage recovery and speculation.

    Args:
        plan: the compiled graph.
        first: the app's first batch.
        speculation: launch copies of stragglers.
        multiplier: a task is a straggler past ``multiplier`` x its stage's median.
        quantile: share of a stage that must have finished before speculating.
        retain_inputs: keep input blocks (both copies) until every state partition's
            checkpoint covers their batch, at most this many batches back (0: free them
            when their batch is done). A lost state partition is then rebuilt from its
            checkpoint by map tasks over blocks still held, all batches in parallel, with
            no re-read from Kafka (as Spark Streaming keeps received blocks until the
            checkpoint covers them).

    """

    def __init__(
        self,
        plan: Plan,
        first: int,
        *,
        speculation: bool = False,
        multiplier: float = 1.4,
        quantile: float = 0.75,
        min_straggler_seconds: float = 0.05,
        retain_inputs: int = 0,
    ) -> None:
        self.plan = plan
        self.retain_inputs = retain_inputs
        self._stateful_parts = [
            (n.id, p) for n in plan.stateful_nodes() for p in range(plan.nparts[n.id])
        ]
        self.first = first
        self.speculation = speculation
        self.multiplier = multiplier
        self.quantile = quantile
        self.min_straggler_seconds = min_straggler_seconds
        self.slots: dict[str, int] = {}
        self._top_slots = 0
        #: bumped whenever a block location changes (invalidates ``_reduce_locs``)
        self._loc_version = 0
        #: the last reduce's launch locations: (node, batch, inputs), location version, the
        #: map outputs' holders, positions of its other inputs
        self._reduce_locs: (
            tuple[tuple[int, int, int], int, dict[str, list[str]], tuple[int, ...]] | None
        ) = None
        self.busy: dict[str, int] = {}
        self.tasks: dict[str, _Task] = {}
        self.batches: dict[int, _Batch] = {}
        self.locations: dict[str, set[str]] = {}
        self.sizes: dict[str, int] = {}
        self.completed: list[int] = []
        self.stats = SchedulerStats()
        self._reading: set[str] = set()
        self._empty: list[int] = []
        #: tasks re-planned to rebuild blocks of batches no longer in ``batches``
        self.lineage: dict[str, _Task] = {}
        #: last complete checkpoint batch per (node, partition)
        self.checkpoints: dict[tuple[int, int], int] = {}
        self._plans: dict[int, dict[str, TaskSpec]] = {}
        #: PENDING tasks a tick must look at; PENDING tasks known to wait for a block sit in
        #: ``_blocked`` instead, and come back when that block arrives (event-driven
        #: readiness: a tick costs O(ready tasks), not O(all pending tasks))
        self._pending: dict[str, _Task] = {}
        self._pending_sorted = True
        self._losses = 0
        self._blocked: dict[str, _Task] = {}
        self._waiters: dict[str, list[_Task]] = {}
        self._last_speculation = float("-inf")
        self._sorted_workers: list[str] | None = None
        #: worker that last committed each output partition: its transactional producer is
        #: warm, and moving the partition would fence it (a Kafka round of init)
        self.output_owner: dict[tuple[int, int], str] = {}
        self._moved_outputs: set[tuple[int, int]] = set()
        #: workers caught straggling, until when: new tasks go elsewhere while any other
        #: worker has a free slot (a slow node keeps being slow; copying each of its tasks
        #: after the fact costs a straggler threshold per batch)
        self.suspects: dict[str, float] = {}
        self._avoid: frozenset[str] = frozenset()

    def _set(self, t: _Task, status: str) -> None:
        """Change a task's status, keeping the index of pending tasks in step."""
        t.status = status
        self._blocked.pop(t.spec.id, None)
        t.blocked = False
        if status == PENDING:
            self._pending[t.spec.id] = t
            self._pending_sorted = False
        else:
            self._pending.pop(t.spec.id, None)

    def _block(self, t: _Task, missing: list[str]) -> None:
        """Park a pending task until every block in *missing* is added."""
        t.blocked = True
        t.parked_at_loss = self._losses
        waits = set(missing)
        t.awaiting = len(waits)
        self._pending.pop(t.spec.id, None)
        self._blocked[t.spec.id] = t
        for bid in waits:
            self._waiters.setdefault(bid, []).append(t)

    def _wake(self, bid: str) -> None:
        for t in self._waiters.pop(bid, ()):
            if t.blocked and t.status == PENDING:
                t.awaiting -= 1
                if t.awaiting <= 0:
                    t.blocked = False
                    self._blocked.pop(t.spec.id, None)
                    self._pending[t.spec.id] = t
                    self._pending_sorted = False

    def _wake_all(self) -> None:
        """Membership or checkpoints changed: every parked task looks again."""
        for t in list(self._blocked.values()):
            t.blocked = False
            t.parked_at_loss = -1
            self._pending[t.spec.id] = t
            self._pending_sorted = False
        self._blocked.clear()
        self._waiters.clear()

    # -- membership ------------------------------------------------------------------------
    def add_worker(self, worker: str, slots: int) -> None:
        self._sorted_workers = None
        self.slots[worker] = slots
        self._top_slots = max(self.slots.values())
        self.busy.setdefault(worker, 0)

    def remove_worker(self, worker: str) -> list[Instruction]:
        """A worker is gone: its blocks are lost, its running attempts rerun elsewhere.

        Input blocks it shared with a peer are copied again so that every input block
        still needed has two holders (lost state is rebuilt from lineage instead).
        """
        self.slots.pop(worker, None)
        self._top_slots = max(self.slots.values(), default=0)
        self._sorted_workers = None
        self.busy.pop(worker, None)
        self.suspects.pop(worker, None)
        self._losses += 1
        self._loc_version += 1
        self._reading.clear()  # reads sent to the lost worker will not come: ask again
        self._wake_all()
        out: list[Instruction] = []
        live = sorted(self.slots)
        for bid, holders in self.locations.items():
            if worker in holders:
                holders.discard(worker)
                if bid.startswith("in/") and len(holders) == 1 and len(live) > 1:
                    (src,) = holders
                    others = [w for w in live if w != src]
                    target = others[zlib.crc32(bid.encode()) % len(others)]
                    out.append(Replicate(bid, src, target))
        for t in [*self.tasks.values(), *self.lineage.values()]:
            lost = [a for a, (w, _) in t.attempts.items() if w == worker]
            for a in lost:
                del t.attempts[a]
                if t.committer == a:
                    t.committer = None
            if t.status == RUNNING and not t.attempts:
                self._set(t, PENDING)
                self.stats.retried += 1
        return out

    @property
    def workers(self) -> list[str]:
        """Live workers, sorted (cached: membership changes rarely, ticks often)."""
        if self._sorted_workers is None or len(self._sorted_workers) != len(self.slots):
            self._sorted_workers = sorted(self.slots)
        return self._sorted_workers

    # -- blocks ----------------------------------------------------------------------------
    def block_added(self, block_id: str, worker: str, size: int = 0) -> None:
        self._reading.discard(block_id)
        if worker in self.slots:
            self.locations.setdefault(block_id, set()).add(worker)
            self._loc_version += 1
            if size:
                self.sizes[block_id] = size
            self._wake(block_id)

    def read_failed(self, block_id: str) -> None:
        """Re-reading an input block failed: ask again (elsewhere) at the next tick."""
        self._reading.discard(block_id)
        for t in self._waiters.pop(block_id, ()):
            if t.blocked and t.status == PENDING:
                t.blocked = False
                t.parked_at_loss = -1
                self._blocked.pop(t.spec.id, None)
                self._pending[t.spec.id] = t
                self._pending_sorted = False

    def block_lost(self, block_id: str, worker: str) -> None:
        """A fetch found *block_id* missing on *worker*."""
        self._losses += 1
        self.locations.get(block_id, set()).discard(worker)
        self._loc_version += 1

    def locations_of(self, spec: TaskSpec) -> dict[str, list[str]]:
        """Holders of each input block of *spec*, as sent with its launch.

        Hot: a reduce reads every map output of its batch, and every reduce partition reads
        the same ones. Their holders are computed once per (node, batch) and reused until
        any block location changes (a tick launches all the reduces with none changing).
        """
        inputs = spec.inputs
        if spec.kind == "result" and len(inputs) > LOCALITY_MAX_INPUTS:
            # every reduce partition of (node, batch) reads the same map outputs, at the
            # same positions of its inputs; only its other inputs (previous state) differ
            key = (spec.node, spec.batch, len(inputs))
            hit = self._reduce_locs
            if hit is None or hit[0] != key or hit[1] != self._loc_version:
                shuffled = [x for x in inputs if x[0].startswith("sh/")]
                others = tuple(i for i, x in enumerate(inputs) if not x[0].startswith("sh/"))
                hit = self._reduce_locs = (
                    key,
                    self._loc_version,
                    self._locations(shuffled),
                    others,
                )
            out = dict(hit[2])
            out.update(self._locations(inputs[i] for i in hit[3]))
            return out
        return self._locations(inputs)

    def _locations(self, inputs: Iterable[tuple[str, int]]) -> dict[str, list[str]]:
        return {bid: list(self.holders(bid)) for bid, _ in inputs}

    def holders(self, block_id: str) -> set[str]:
        """Workers holding the block (plus :data:`CHECKPOINT` for a checkpointed state)."""
        held = self.locations.get(block_id, set())
        if self._checkpointed(block_id):
            return held | {CHECKPOINT}
        return held

    def _checkpointed(self, block_id: str) -> bool:
        if not self.checkpoints or not block_id.startswith("rd/"):
            return False
        _, node, b, p = block_id.split("/")
        return self.checkpoints.get((int(node), int(p))) == int(b)

    def _available(self, block_id: str) -> bool:
        return bool(self.locations.get(block_id)) or self._checkpointed(block_id)

    def set_checkpoint(self, node: int, part: int, batch: int) -> None:
        """State of (node, part) at *batch* is in the checkpoint store (lineage stops there)."""
        if batch > self.checkpoints.get((node, part), -1):
            self.checkpoints[(node, part)] = batch
            self._loc_version += 1
            self._wake_all()

    # -- batches ---------------------------------------------------------------------------
    def add_batch(self, b: int, now: float) -> list[TaskSpec]:
        """Plan batch *b*; its input blocks are reported with :meth:`block_added`."""
        specs = self.plan.tasks_for_batch(b, self.first)
        ids: list[str] = []
        outputs: set[str] = set()
        if any(p.spec.batch > b for p in self._pending.values()):
            self._pending_sorted = False
        for s in specs:
            self.tasks[s.id] = task = _Task(s)
            self._pending[s.id] = task
            ids.append(s.id)
            if s.kind == "output":
                outputs.add(s.id)
        self.batches[b] = _Batch(ids, outputs, now)
        if not ids:  # nothing to run (a window between slide ends): complete on next tick
            self._empty.append(b)
        return specs

    def pending_batches(self) -> list[int]:
        return sorted(self.batches)

    # -- task events -----------------------------------------------------------------------
    def request_commit(self, task_id: str, attempt: int) -> str:
        """The commit right of an output task: ``granted`` to the first attempt that asks.

        Returns ``denied`` to any other attempt, and ``wait`` while an earlier batch of the
        same output partition has not committed (outputs commit in batch order, so a
        consumer of the output sees batches in order and a sink's "last batch written"
        marker is exact).
        """
        t = self.tasks.get(task_id)
        if t is None or t.status == DONE or attempt not in t.attempts:
            return "denied"
        if self._earlier_output_pending(t.spec):
            return "wait"
        if t.committer is None:
            t.committer = attempt
        return "granted" if t.committer == attempt else "denied"

    def _earlier_output_pending(self, spec: TaskSpec) -> bool:
        for b in self.batches:
            if b >= spec.batch:
                continue
            other = self.tasks.get(f"out/{spec.node}/{b}/{spec.part}")
            if other is not None and other.status != DONE:
                return True
        return False

    def task_finished(
        self, task_id: str, attempt: int, worker: str, now: float, size: int = 0
    ) -> list[Instruction]:
        """An attempt finished (output tasks: after committing). First one wins."""
        t = self.tasks.get(task_id) or self.lineage.get(task_id)
        out: list[Instruction] = []
        if t is None or t.status == DONE or attempt not in t.attempts:
            # a losing or stale attempt: drop its block unless that worker holds the winner's
            if t is not None and t.spec.kind != "output" and worker not in self.holders(task_id):
                out.append(FreeBlocks(worker, (task_id,)))
            return out
        if t.spec.kind == "output" and t.committer != attempt:
            return out
        w, t0 = t.attempts.pop(attempt)
        self.busy[w] = max(0, self.busy.get(w, 1) - 1)
        self._set(t, DONE)
        t.duration = now - t0
        if attempt in t.speculative_attempts:
            self.stats.speculative_won += 1
        for a, (ow, _) in t.attempts.items():
            self.busy[ow] = max(0, self.busy.get(ow, 1) - 1)
            out.append(CancelTask(task_id, ow, a))
        t.attempts.clear()
        if t.spec.kind != "output":
            self.block_added(task_id, worker, size)
        else:
            self.output_owner.setdefault((t.spec.node, t.spec.part), worker)
        batch = self.batches.get(t.spec.batch)
        if batch is not None:
            batch.outputs_left.discard(task_id)
            if not batch.outputs_left and all(
                self.tasks[x].status == DONE for x in batch.tasks if x in self.tasks
            ):
                out.extend(self._complete(t.spec.batch))
        return out

    def task_failed(
        self,
        task_id: str,
        attempt: int,
        worker: str,
        missing: str | None = None,
        now: float = 0.0,
        gone_from: list[str] | None = None,
    ) -> None:
        """An attempt failed; with *missing*, because that input block was gone.

        *gone_from* names the other workers the attempt found without the block (or with a
        stale copy of it); they stop counting as its holders.

        A task that failed for another reason (a sink or dependency error) is retried with
        exponential backoff (50 ms doubling, at most 2 s), so a dependency outage does not
        turn into a hot retry loop.
        """
        t = self.tasks.get(task_id) or self.lineage.get(task_id)
        if missing:
            self.block_lost(missing, worker)
            for other in gone_from or ():
                self.block_lost(missing, other)
        if t is None or attempt not in t.attempts:
            return
        w, _ = t.attempts.pop(attempt)
        self.busy[w] = max(0, self.busy.get(w, 1) - 1)
        if t.committer == attempt:
            t.committer = None
        if t.status == RUNNING and not t.attempts:
            self._set(t, PENDING)
            self.stats.retried += 1
            if not missing:
                t.failures += 1
                t.not_before = now + min(2.0, 0.05 * 2 ** (t.failures - 1))

    def _complete(self, b: int) -> list[Instruction]:
        self.completed.append(b)
        out: list[Instruction] = [BatchCompleted(b)]
        done_upto = self.done_upto()
        # forget finished batches and free what no later batch reads
        for ob in sorted(self.batches):
            if ob > done_upto:
                break
            for x in self.batches.pop(ob).tasks:
                self.tasks.pop(x, None)
                self._pending.pop(x, None)
                self._blocked.pop(x, None)
        # blocks of old batches that unfinished work still reads (a rebuilt lineage, the
        # previous state of the next batch) stay, whatever their batch number says
        needed = {
            bid
            for t in (*self.tasks.values(), *self.lineage.values())
            if t.status != DONE
            for bid, _ in t.spec.inputs
            if block_batch(bid) <= done_upto
        }
        for tid in [x for x, t in self.lineage.items() if t.status == DONE]:
            if self.plan.freeable(tid, done_upto) and tid not in needed:
                del self.lineage[tid]
        floor = self._input_floor(done_upto)
        per_worker: dict[str, list[str]] = {}
        for bid in list(self.locations):
            if bid.startswith("in/") and block_batch(bid) > floor:
                continue
            if self.plan.freeable(bid, done_upto) and bid not in needed:
                self._loc_version += 1
                for w in self.locations.pop(bid):
                    per_worker.setdefault(w, []).append(bid)
                self.sizes.pop(bid, None)
        for w, ids in sorted(per_worker.items()):
            out.append(FreeBlocks(w, tuple(sorted(ids))))
        return out

    def _input_floor(self, done_upto: int) -> int:
        """Input blocks of batches up to this one may be freed (see ``retain_inputs``)."""
        if not self.retain_inputs or not self._stateful_parts:
            return done_upto
        covered = min(self.checkpoints.get(k, self.first - 1) for k in self._stateful_parts)
        return max(min(done_upto, covered), done_upto - self.retain_inputs)

    def done_upto(self) -> int:
        """Every batch up to this one is complete (batches complete out of order)."""
        pending = [
            b
            for b in self.batches
            if self.batches[b].outputs_left
            or any(self.tasks[x].status != DONE for x in self.batches[b].tasks if x in self.tasks)
        ]
        if pending:
            return min(pending) - 1
        return max(self.completed) if self.completed else self.first - 1

    # -- launching -------------------------------------------------------------------------
    def tick(self, now: float) -> list[Instruction]:
        """Launch ready tasks into free slots (locality first), then speculative copies."""
        out: list[Instruction] = []
        while self._empty:
            out.extend(self._complete(self._empty.pop(0)))
        free = _Free(self.slots, self.busy)
        if not free.any():
            return out
        if self.suspects or self._avoid:
            for gone in [x for x, until in self.suspects.items() if until <= now]:
                del self.suspects[gone]
            self._avoid = frozenset(self.suspects)
        # lineage (recovery) tasks first, then by batch: older work unblocks newer work
        if not self._pending_sorted:
            order = sorted(
                self._pending.values(),
                key=lambda t: (t.spec.id not in self.lineage, t.spec.batch),
            )
            self._pending = {t.spec.id: t for t in order}
            self._pending_sorted = True
        for t in list(self._pending.values()):
            if t.status != PENDING or t.blocked or t.not_before > now:
                continue
            if t.spec.kind == "output" and self._earlier_output_pending(t.spec):
                continue
            missing: list[str] = []
            lost: list[str] = []
            if t.awaiting != 0 or t.parked_at_loss != self._losses:
                # (else: woken with everything it awaited, and nothing lost since)
                # an input whose task is pending or running is on its way, not lost: only
                # the others are walked (a reduce waits on every map output of its batch)
                locs, tasks, lineage = self.locations, self.tasks, self.lineage
                ckpt = bool(self.checkpoints)
                for bid, _ in t.spec.inputs:
                    if locs.get(bid) or (ckpt and self._checkpointed(bid)):
                        continue
                    missing.append(bid)
                    p = tasks.get(bid) or lineage.get(bid)
                    if p is None or p.status == DONE:
                        lost.append(bid)
            t.parked_at_loss = -1
            if missing:
                # every lost input at once, so that recovery of all of them (other
                # partitions, other batches) starts in parallel; then park the task
                if lost:
                    out.extend(self._recompute(lost))
                self._block(t, missing)
                continue
            if t.spec.kind == "output":
                # output partitions are pinned to one worker: its transactional producer
                # stays warm and no other worker fences it; moved only when it is lost
                home = self._output_home(t.spec)
                if free.get(home, 0) <= 0:
                    continue
                w: str | None = home
            else:
                w = self._pick_worker(t.spec, free)
            if w is None:
                return out
            out.append(self._launch(t, w, now, speculative=False))
        if self.speculation and now - self._last_speculation >= SPECULATION_EVERY_S:
            self._last_speculation = now
            out.extend(self._speculate(now, free))
        return out

    def _output_home(self, spec: TaskSpec) -> str:
        key = (spec.node, spec.part)
        home = self.output_owner.get(key)
        if home not in self.slots:
            live = self.workers
            home = live[zlib.crc32(f"{spec.node}/{spec.part}".encode()) % len(live)]
            self.output_owner[key] = home
        return home

    def _move_output_home(self, spec: TaskSpec, slow: str) -> None:
        # at most once per partition: each move re-inits a transactional producer, and a
        # dependency outage makes every output look slow (moves would ping-pong)
        key = (spec.node, spec.part)
        if key in self._moved_outputs:
            return
        self._moved_outputs.add(key)
        others = [w for w in self.workers if w != slow]
        if others:
            load = {w: 0 for w in others}
            for home in self.output_owner.values():
                if home in load:
                    load[home] += 1
            self.output_owner[(spec.node, spec.part)] = min(others, key=lambda w: (load[w], w))

    def _launch(self, t: _Task, w: str, now: float, speculative: bool) -> LaunchTask:
        a = t.next_attempt
        t.next_attempt += 1
        t.attempts[a] = (w, now)
        self._set(t, RUNNING)
        self.busy[w] = self.busy.get(w, 0) + 1
        self.stats.launched += 1
        batch = self.batches.get(t.spec.batch)
        if batch is not None and batch.first_launch is None:
            batch.first_launch = now
        return LaunchTask(t.spec, w, a, speculative)

    def _pick_worker(self, spec: TaskSpec, free: _Free, exclude: Iterable[str] = ()) -> str | None:
        """The free worker holding most input bytes; else the one with most free slots.

        Ties go to more free slots, then to the first worker by name (deterministic).
        Workers caught straggling are passed over while any other worker is free.
        Costs O(holders of the inputs), plus O(workers) only when no holder is free.
        """
        ex = set(exclude)
        if self._avoid:
            w = self._pick_among(spec, free, ex | self._avoid)
            if w is not None:
                return w
        return self._pick_among(spec, free, ex)

    def _pick_among(self, spec: TaskSpec, free: _Free, ex: set[str]) -> str | None:
        scores: dict[str, int] = {}
        # a task reading many blocks (a reduce over every map output) has no useful
        # locality: its inputs are everywhere (as in Spark, which skips it too)
        inputs = spec.inputs if len(spec.inputs) <= LOCALITY_MAX_INPUTS else ()
        for bid, _ in inputs:
            size = self.sizes.get(bid, 1)
            for w in self.locations.get(bid, ()):
                if free.get(w, 0) > 0 and w not in ex:
                    scores[w] = scores.get(w, 0) + size
        if scores:
            return max(sorted(scores), key=lambda w: (scores[w], free[w]))
        slots, busy = self.slots, self.busy
        top = self._top_slots
        best: str | None = None
        most = 0
        for w in self.workers:
            n = slots[w] - busy.get(w, 0)
            if n > most and w not in ex:
                best, most = w, n
                if n >= top:
                    break  # an idle worker: none has more free slots
        return best

    def _recompute(self, missing: list[str]) -> list[Instruction]:
        """Lineage: make every missing block on the way to *missing* be rebuilt.

        A block is rebuilt by re-running the task that produced it (re-planned if its
        batch is already forgotten), whose own missing inputs are rebuilt in turn. The
        walk stops at blocks some worker holds, at checkpointed state, and at input blocks,
        which the shell re-reads from Kafka by their logged offset range (:class:`ReadInput`,
        asked once per loss). Independent tasks of the rebuilt lineage (other partitions,
        map sides of other batches) become ready together and run in parallel.
        """
        out: list[Instruction] = []
        seen: set[str] = set()
        for bid in missing:
            self._ensure(bid, out, seen)
        return out

    def _ensure(self, bid: str, out: list[Instruction], seen: set[str]) -> None:
        if bid in seen or self._available(bid):
            return
        seen.add(bid)
        t = self.tasks.get(bid) or self.lineage.get(bid)
        if t is None:
            if bid.startswith("in/"):
                if bid not in self._reading:
                    self._reading.add(bid)
                    out.append(ReadInput(bid))
                    self.stats.reread += 1
                return
            spec = self._spec_for(bid)
            if spec is None:
                return
            t = _Task(spec)
            self.lineage[bid] = t
            self._pending[bid] = t
            self._pending_sorted = False
            self.stats.recomputed += 1
        elif t.status == DONE:
            self._set(t, PENDING)  # its block was lost: run it again
            self.stats.recomputed += 1
        else:
            return  # pending or running: the block is on its way, not lost
        for ibid, _ in t.spec.inputs:
            self._ensure(ibid, out, seen)

    def _spec_for(self, bid: str) -> TaskSpec | None:
        b = block_batch(bid)
        specs = self._plans.get(b)
        if specs is None:
            specs = {s.id: s for s in self.plan.tasks_for_batch(b, self.first)}
            self._plans[b] = specs
            while len(self._plans) > 64:
                self._plans.pop(min(self._plans))
        return specs.get(bid)

    def _speculate(self, now: float, free: _Free) -> list[Instruction]:
        out: list[Instruction] = []
        by_stage: dict[tuple[str, int], list[_Task]] = {}
        for t in self.tasks.values():
            by_stage.setdefault((t.spec.stage, t.spec.batch), []).append(t)
        for group in by_stage.values():
            done = [t.duration for t in group if t.status == DONE]
            if len(group) < 2 or len(done) < self.quantile * len(group):
                continue
            threshold = max(self.min_straggler_seconds, self.multiplier * statistics.median(done))
            for t in group:
                if t.status != RUNNING or t.speculated or len(t.attempts) != 1:
                    continue
                ((w, t0),) = t.attempts.values()
                if now - t0 <= threshold:
                    continue
                self.suspects[w] = now + SUSPECT_SECONDS
                if t.spec.kind == "output":
                    # a copy would fence the pinned producer mid-commit: instead, later
                    # batches of this output partition go to another worker
                    t.speculated = True
                    self._move_output_home(t.spec, w)
                    continue
                target = self._pick_worker(t.spec, free, exclude=[w])
                if target is None:
                    return out
                t.speculated = True
                self.stats.speculative_launched += 1
                launch = self._launch(t, target, now, speculative=True)
                t.speculative_attempts.add(launch.attempt)
                out.append(launch)
        return out

    def describe_batch(self, b: int) -> list[dict[str, object]]:
        """The unfinished tasks of batch *b* and what each waits for (status pages, debugging)."""
        batch = self.batches.get(b)
        out: list[dict[str, object]] = []
        lineage = [x for x, t in self.lineage.items() if t.status != DONE][:20]
        for tid in [*lineage, *(batch.tasks if batch else [])]:
            t = self.tasks.get(tid) or self.lineage.get(tid)
            if t is None or t.status == DONE:
                continue
            out.append(
                {
                    "task": tid,
                    "status": t.status,
                    "parked": t.blocked,
                    "awaiting": t.awaiting,
                    "attempts": sorted(w for w, _ in t.attempts.values()),
                    "missing": [bid for bid, _ in t.spec.inputs if not self._available(bid)][:5],
                }
            )
        return out

    def running_count(self) -> int:
        """Task attempts running now (over all workers)."""
        return sum(self.busy.values())

    def idle(self) -> bool:
        return not self.batches
