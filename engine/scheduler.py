"""The task scheduler: a pure state machine shared by the in-process runner and the fleet.

It takes events (a batch's input blocks are ready, a task finished or failed, a worker
joined or was lost, the clock ticked) and returns instructions (launch this task attempt on
that worker, free these blocks, a batch completed). It does no I/O and reads no clock: the
caller passes ``now``. Lineage lives here: a needed block with no live holder is recomputed
by re-running the task that produced it (or, for an input block, re-read from Kafka).

Readiness is event-driven and costs O(1) per event whatever the fleet's size: a task
waiting for blocks is parked until they arrive; a reduce waits on a counter of its map
stage's available outputs (as Spark's ``MapOutputTracker`` tracks a shuffle), not on each
of them, and a lost map output re-blocks the stage's reduces until it is rebuilt.

Public: its callers are :class:`engine.local.LocalRunner`, the coordinator (``ops``) and the
scale benchmark; they feed it events and carry out its instructions (:class:`LaunchTask`,
:class:`ReadInput`, :class:`FreeBlocks`, :class:`BatchCompleted`, ...).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import statistics
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine._sched_index import InputSplit, SlotIndex, shuffle_group, split_inputs
from engine.codec import pack, unpack
from engine.graph import Node
from engine.plan import SHUFFLE, Plan, TaskSpec, block_batch

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
#: Completed batch numbers kept in ``Scheduler.completed`` (status and debugging only):
#: bounded, so that a coordinator running for weeks keeps a flat memory profile.
KEEP_COMPLETED = 100


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
    #: in the launch queue (``Scheduler._queue``)
    queued: bool = False
    #: one of the tasks of a live batch (counted in its ``_Batch.left``), not lineage
    member: bool = False


@dataclass
class _Planned:
    """A batch's tasks, planned (maybe ahead, see :meth:`Scheduler.prepare`)."""

    batch: int
    specs: list[TaskSpec]
    tasks: dict[str, _Task]
    stages: dict[str, int]
    outputs: set[str]


def _planned(b: int, specs: list[TaskSpec]) -> _Planned:
    tasks: dict[str, _Task] = {}
    stages: dict[str, int] = {}
    outputs: set[str] = set()
    for s in specs:
        tasks[s.id] = _Task(s, member=True)
        stages[s.stage] = stages.get(s.stage, 0) + 1
        if s.kind == "output":
            outputs.add(s.id)
    return _Planned(b, specs, tasks, stages, outputs)


@dataclass
class _Batch:
    tasks: list[str]
    outputs_left: set[str]
    start: float
    first_launch: float | None = None
    #: tasks of the batch not DONE
    left: int = 0


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


class StageHolders:
    """Where a map stage's outputs are: ``holders[m]`` indexes ``hosts`` for output ``m``.

    Built once per stage and location change and shared by every reduce of the stage;
    its msgpack form is made once too (:meth:`packed`), so each reduce's launch message
    carries the same bytes instead of encoding the stage again.
    """

    __slots__ = ("_packed", "holders", "hosts")

    def __init__(self, hosts: tuple[str, ...], holders: list[list[int]]) -> None:
        self.hosts = hosts
        self.holders = holders
        self._packed: bytes | None = None

    def packed(self) -> bytes:
        if self._packed is None:
            self._packed = pack([list(self.hosts), self.holders])
        return self._packed

    @classmethod
    def unpacked(cls, data: bytes) -> StageHolders:
        hosts, holders = unpack(data)
        return cls(tuple(str(h) for h in hosts), list(holders))

    def of(self, m: int) -> list[str] | None:
        if 0 <= m < len(self.holders):
            hosts = self.hosts
            return [hosts[x] for x in self.holders[m]]
        return None


class ShuffleLocations(Mapping[str, list[str]]):
    """Holders of a reduce's inputs: its map stages' outputs by index, then its others.

    ``stages`` maps a map stage (``sh/{node}/{side}/{batch}``) to its
    :class:`StageHolders`, which every reduce of the stage shares, so a reduce's launch
    costs O(stages + others) to build, check and send, not O(map outputs) (at 1,000
    workers a stage has 4,000; as Spark's ``MapOutputTracker`` hands out a shuffle's map
    statuses, not one lookup per block). ``others`` are the holders of its other inputs
    (a previous state partition). As a mapping it is ``block id -> holders`` over all.
    """

    __slots__ = ("others", "stages")

    def __init__(self, stages: dict[str, StageHolders], others: dict[str, list[str]]) -> None:
        self.stages = stages
        self.others = others

    def get(self, block_id: str, default: Any = None) -> Any:
        g, _, m = block_id.rpartition("/")
        stage = self.stages.get(g)
        if stage is not None and m.isdigit():
            out = stage.of(int(m))
            if out is not None:
                return out
        return self.others.get(block_id, default)

    def __getitem__(self, block_id: str) -> list[str]:
        out: list[str] | None = self.get(block_id)
        if out is None:
            raise KeyError(block_id)
        return out

    def __contains__(self, block_id: object) -> bool:
        return isinstance(block_id, str) and self.get(block_id) is not None

    def __iter__(self) -> Iterator[str]:
        for g, stage in self.stages.items():
            for m in range(len(stage.holders)):
                yield f"{g}/{m}"
        yield from self.others

    def __len__(self) -> int:
        return sum(len(st.holders) for st in self.stages.values()) + len(self.others)


#: launches per tick when the caller sends them as they come (see ``Scheduler.tick``)
LAUNCH_CHUNK = 256

#: batches of retained blocks (inputs and the blocks on their way to state) freed per
#: batch completion at most: more than one, so that the backlog a checkpoint leaves clears
RETAINED_FREED_PER_BATCH = 2


def _lineage_prefixes(plan: Plan) -> tuple[str, ...]:
    """Block id prefixes of the boundary blocks that state nodes (``state``) depend on.

    Their map outputs (``sh/``), and upstream of them every materialized (``rd/``) and
    shuffled (``sh/``) block back to the sources, whose input blocks are retained anyway.
    """
    out: set[str] = set()
    seen: set[int] = set()

    def walk(n: Node) -> None:
        for p in n.parents:
            if p.id in seen:
                continue
            seen.add(p.id)
            if p.kind != "source" and p.id in plan.boundary:
                out.add(f"rd/{p.id}/")
                if p.kind in SHUFFLE:
                    out.add(f"sh/{p.id}/")
            walk(p)

    for n in plan.stateful_nodes():
        if n.kind == "state":
            out.add(f"sh/{n.id}/")
            walk(n)
    return tuple(sorted(out))


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
            when their batch is done). The blocks on the way from the inputs to a state
            partition (map outputs, reduced partitions) are kept as long. A lost state
            partition is then rebuilt from its checkpoint by re-running only the lost
            worker's part of that lineage over blocks still held, all batches in
            parallel, with no re-read from Kafka (as Spark Streaming keeps received blocks
            until the checkpoint covers them, and a stateful DStream's generated RDDs and
            their shuffle outputs as long). At 1,000 workers a lost worker's state is
            rebuilt by about 10 tasks per batch instead of every map task of every batch
            since the checkpoint.

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
        #: blocks kept as inputs are (see ``retain_inputs``): input blocks, and the blocks
        #: on the way from them to state partitions
        self._retained = ("in/", *_lineage_prefixes(plan))
        self.first = first
        self.speculation = speculation
        self.multiplier = multiplier
        self.quantile = quantile
        self.min_straggler_seconds = min_straggler_seconds
        #: free slots per live worker; ``slots`` and ``busy`` are its dicts
        self._free = SlotIndex()
        self.slots: dict[str, int] = self._free.slots
        self.busy: dict[str, int] = self._free.busy
        #: per map stage, its outputs' holders as launches send them (ShuffleLocations);
        #: an entry goes when a block of its stage changes holders
        self._stage_locs: dict[str, StageHolders] = {}
        self.tasks: dict[str, _Task] = {}
        self.batches: dict[int, _Batch] = {}
        self.locations: dict[str, set[str]] = {}
        self.sizes: dict[str, int] = {}
        #: the latest completed batches (trimmed to the last ``KEEP_COMPLETED``)
        self.completed: list[int] = []
        self._max_completed: int | None = None
        self.stats = SchedulerStats()
        self._reading: set[str] = set()
        self._empty: list[int] = []
        #: ids in ``locations`` per batch (input blocks apart): freeing walks only the
        #: batches that may go, not every block held (inputs stay for many batches)
        self._held: dict[int, list[str]] = {}
        #: blocks each worker holds (the inverse of ``locations``), for ``remove_worker``
        self._held_by: dict[str, set[str]] = {}
        #: workers set apart by ``set_unresponsive``: their slots and the blocks they held
        self._unresponsive: dict[str, tuple[int, set[str]]] = {}
        self._held_inputs: dict[int, list[str]] = {}
        #: tasks re-planned to rebuild blocks of batches no longer in ``batches``
        self.lineage: dict[str, _Task] = {}
        #: last complete checkpoint batch per (node, partition)
        self.checkpoints: dict[tuple[int, int], int] = {}
        #: a batch planned ahead by :meth:`prepare`, with its tasks
        self._prepared: _Planned | None = None
        #: PENDING tasks a tick must look at; PENDING tasks known to wait for a block sit in
        #: ``_blocked`` instead, and come back when that block arrives (event-driven
        #: readiness: a tick costs O(ready tasks), not O(all pending tasks))
        self._pending: dict[str, _Task] = {}
        #: the pending tasks in launch order, (not lineage, batch, seq, task): recovery
        #: first, then older batches; entries of tasks no longer pending are skipped
        self._queue: list[tuple[bool, int, int, _Task]] = []
        self._seq = itertools.count()
        self._losses = 0
        self._blocked: dict[str, _Task] = {}
        #: parked tasks per awaited block
        self._waiters: dict[str, list[_Task]] = {}
        #: stage-level waiting: parked reduces per map stage (``sh/{node}/{side}/{batch}``)
        #: and per count of its outputs they read, woken when that many are available
        self._group_waiters: dict[str, dict[int, list[_Task]]] = {}
        #: map outputs with a live holder, per map stage
        self._avail: dict[str, int] = {}
        #: the loss count at which a stage's missing outputs were last looked for lost ones
        self._group_checked: dict[str, int] = {}
        #: the inputs of the reduces of (node, batch, len(inputs)) as whole map stages
        self._splits: dict[tuple[int, int, int], InputSplit | None] = {}
        #: tasks running now, and per (stage, batch): task count and finished durations
        self._running: dict[str, _Task] = {}
        self._stages: dict[tuple[str, int], tuple[int, dict[str, float]]] = {}
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
        #: when the earliest suspicion ends (the set avoided is refreshed then)
        self._suspects_expire = float("-inf")
        #: ready output tasks waiting for a free slot on their pinned worker
        self._home_waiters: dict[str, list[_Task]] = {}

    def _set(self, t: _Task, status: str) -> None:
        """Change a task's status, keeping the indexes (pending, running, batch) in step."""
        old = t.status
        t.status = status
        tid = t.spec.id
        if t.blocked:
            self._blocked.pop(tid, None)
            t.blocked = False
        if status == PENDING:
            self._pending[tid] = t
            self._enqueue(t)
        else:
            self._pending.pop(tid, None)
        if status == RUNNING:
            self._running[tid] = t
        else:
            self._running.pop(tid, None)
        if t.member and (old == DONE) != (status == DONE):
            batch = self.batches.get(t.spec.batch)
            if batch is not None:
                batch.left += 1 if old == DONE else -1

    def _release(self, w: str) -> None:
        """An attempt on *w* ended: a slot is free, outputs pinned to *w* may go."""
        self._free.release(w)
        waiting = self._home_waiters.pop(w, None)
        if waiting:
            for t in waiting:
                self._enqueue(t)

    def _enqueue(self, t: _Task) -> None:
        if not t.queued:
            t.queued = True
            key = (t.spec.id not in self.lineage, t.spec.batch, next(self._seq), t)
            heapq.heappush(self._queue, key)

    def _split_of(self, spec: TaskSpec) -> InputSplit | None:
        """A reduce's inputs as whole map stages (cached per node and batch), else None."""
        inputs = spec.inputs
        if spec.kind != "result" or not inputs or not inputs[0][0].startswith("sh/"):
            return None
        key = (spec.node, spec.batch, len(inputs))
        if key in self._splits:
            split = self._splits[key]
        else:
            split = self._splits[key] = split_inputs(inputs)
        if split is not None and not split.matches(inputs):
            return split_inputs(inputs)
        return split

    def _block(self, t: _Task, missing: list[str], groups: list[tuple[str, int]]) -> None:
        """Park a pending task until its missing blocks and map stages are available.

        It waits on each block in *missing* and on a counter per map stage in *groups*
        (``(stage, outputs read)``), not on each of that stage's outputs.
        """
        t.blocked = True
        t.parked_at_loss = self._losses
        waits = set(missing)
        t.awaiting = len(waits) + len(groups)
        self._pending.pop(t.spec.id, None)
        self._blocked[t.spec.id] = t
        for bid in waits:
            self._waiters.setdefault(bid, []).append(t)
        for g, n in groups:
            self._group_waiters.setdefault(g, {}).setdefault(n, []).append(t)

    def _unpark(self, t: _Task, rescan: bool = False) -> None:
        t.blocked = False
        if rescan:
            t.parked_at_loss = -1
        self._blocked.pop(t.spec.id, None)
        self._pending[t.spec.id] = t
        self._enqueue(t)

    def _wake(self, bid: str) -> None:
        for t in self._waiters.pop(bid, ()):
            if t.blocked and t.status == PENDING:
                t.awaiting -= 1
                if t.awaiting <= 0:
                    self._unpark(t)

    def _now_available(self, bid: str) -> None:
        """*bid* got its first live holder: count it for its map stage, wake the reduces."""
        g = shuffle_group(bid)
        if g is None:
            return
        n = self._avail[g] = self._avail.get(g, 0) + 1
        by_count = self._group_waiters.get(g)
        if by_count:
            for t in by_count.pop(n, ()):
                if t.blocked and t.status == PENDING:
                    t.awaiting -= 1
                    if t.awaiting <= 0:
                        self._unpark(t)
            if not by_count:
                del self._group_waiters[g]

    def _now_unavailable(self, bid: str) -> None:
        """*bid* lost its last holder: a lost map output re-blocks the reduces of its stage.

        Parked reduces of that stage look again at the next tick, which has the lost
        output rebuilt (they would otherwise wait for a count that never comes).
        """
        g = shuffle_group(bid)
        if g is None:
            return
        n = self._avail.get(g, 0) - 1
        if n > 0:
            self._avail[g] = n
        else:
            self._avail.pop(g, None)
        for waiting in self._group_waiters.pop(g, {}).values():
            for t in waiting:
                if t.blocked and t.status == PENDING:
                    self._unpark(t, rescan=True)

    def _lost_in_group(self, g: str, count: int) -> list[str]:
        """Outputs of map stage *g* with no live holder and no attempt on its way."""
        locs, tasks, lineage = self.locations, self.tasks, self.lineage
        out: list[str] = []
        for m in range(count):
            bid = f"{g}/{m}"
            if locs.get(bid):
                continue
            p = tasks.get(bid) or lineage.get(bid)
            if p is None or p.status == DONE:
                out.append(bid)
        return out

    def _wake_all(self) -> None:
        """Membership or checkpoints changed: every parked task looks again."""
        for t in list(self._blocked.values()):
            t.blocked = False
            t.parked_at_loss = -1
            self._pending[t.spec.id] = t
            self._enqueue(t)
        self._blocked.clear()
        self._waiters.clear()
        self._group_waiters.clear()

    # -- membership ------------------------------------------------------------------------
    def add_worker(self, worker: str, slots: int) -> None:
        self._sorted_workers = None
        self._unresponsive.pop(worker, None)  # (re)registered: it reports its blocks anew
        self._free.add(worker, slots)

    def set_unresponsive(self, worker: str) -> list[Instruction]:
        """*worker* did not answer in time (a seal): run its work elsewhere, for now.

        As :meth:`remove_worker` (its attempts run again elsewhere, blocks it alone holds
        are rebuilt from lineage, outputs pinned to it move), but reversibly: the blocks it
        held are remembered for :meth:`responsive_again`. A paused worker then costs the
        rest of the fleet the seal wait and a rebuild, not the heartbeat timeout (after
        which the shell declares it lost, and this is forgotten).
        """
        if worker not in self.slots or worker in self._unresponsive:
            return []
        slots = self.slots[worker]
        held = set(self._held_by.get(worker, ()))
        out = self.remove_worker(worker)
        self._unresponsive[worker] = (slots, held)
        return out

    def responsive_again(self, worker: str) -> list[Instruction]:
        """*worker* answered again: it takes tasks, and its blocks count again.

        Blocks it held that were freed meanwhile are freed on it too; the others are its
        again (those rebuilt elsewhere meanwhile just gain a holder).
        """
        entry = self._unresponsive.pop(worker, None)
        if entry is None:
            return []
        slots, held = entry
        self.add_worker(worker, slots)
        stale: list[str] = []
        for bid in sorted(held):
            if bid in self.locations:
                self.block_added(bid, worker, self.sizes.get(bid, 0))
            else:
                stale.append(bid)
        return [FreeBlocks(worker, tuple(stale))] if stale else []

    def unresponsive(self) -> list[str]:
        """Workers set apart by :meth:`set_unresponsive`, sorted."""
        return sorted(self._unresponsive)

    def remove_worker(self, worker: str) -> list[Instruction]:
        """A worker is gone: its blocks are lost, its running attempts rerun elsewhere.

        Input blocks it shared with a peer are copied again so that every input block
        still needed has two holders (lost state is rebuilt from lineage instead).
        """
        self._free.remove(worker)
        self._unresponsive.pop(worker, None)
        for t in self._home_waiters.pop(worker, ()):
            self._enqueue(t)  # its output partition moves to another worker
        self._sorted_workers = None
        self.suspects.pop(worker, None)
        self._losses += 1
        self._stage_locs.clear()
        self._reading.clear()  # reads sent to the lost worker will not come: ask again
        self._wake_all()
        out: list[Instruction] = []
        live = sorted(self.slots)
        # the blocks it held, from the per-worker index (not a walk over every block)
        for bid in sorted(self._held_by.pop(worker, ())):
            holders = self.locations.get(bid)
            if holders is not None and worker in holders:
                holders.discard(worker)
                if not holders:
                    self._now_unavailable(bid)
                elif bid.startswith("in/") and len(holders) == 1 and len(live) > 1:
                    (src,) = holders
                    # the live worker after the source in a ring of the others, picked by
                    # the block's hash (O(log W), not a copy of the worker list per block)
                    i = zlib.crc32(bid.encode()) % (len(live) - 1)
                    j = bisect.bisect_left(live, src)
                    out.append(Replicate(bid, src, live[i if i < j else i + 1]))
        # only running attempts can be on the lost worker
        for t in list(self._running.values()):
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
            holders = self.locations.get(block_id)
            if holders is None:
                holders = self.locations[block_id] = set()
                by_batch = self._held_inputs if block_id.startswith(self._retained) else self._held
                by_batch.setdefault(block_batch(block_id), []).append(block_id)
            first = not holders
            holders.add(worker)
            held = self._held_by.get(worker)
            if held is None:
                self._held_by[worker] = {block_id}
            else:
                held.add(block_id)
            if self._stage_locs:
                self._forget_stage_holders(block_id)
            if size:
                self.sizes[block_id] = size
            if first:
                self._now_available(block_id)
            self._wake(block_id)

    def read_failed(self, block_id: str) -> None:
        """Re-reading an input block failed: ask again (elsewhere) at the next tick."""
        self._reading.discard(block_id)
        for t in self._waiters.pop(block_id, ()):
            if t.blocked and t.status == PENDING:
                self._unpark(t, rescan=True)

    def block_lost(self, block_id: str, worker: str) -> None:
        """A fetch found *block_id* missing on *worker*."""
        self._losses += 1
        holders = self.locations.get(block_id)
        if holders and worker in holders:
            holders.discard(worker)
            self._held_by.get(worker, set()).discard(block_id)
            if not holders:
                self._now_unavailable(block_id)
        self._forget_stage_holders(block_id)

    def _forget_stage_holders(self, block_id: str) -> None:
        """A block changed holders: its map stage's shared holder table is stale."""
        g = shuffle_group(block_id)
        if g is not None:
            self._stage_locs.pop(g, None)

    def locations_of(self, spec: TaskSpec) -> Mapping[str, list[str]]:
        """Holders of each input block of *spec*, as sent with its launch.

        Hot: a reduce reads every map output of its batch, and every reduce partition reads
        the same ones. A reduce gets a :class:`ShuffleLocations`: its map stages' holders,
        built once per stage and shared until a block of that stage changes holders (a
        tick launches all the reduces with none changing), plus its other inputs'. Callers
        only read what they get (it is never changed after it is handed out).
        """
        inputs = spec.inputs
        split = self._split_of(spec) if len(inputs) > LOCALITY_MAX_INPUTS else None
        if split is None:
            return self._locations(inputs)
        stages = {g: self._stage_holders(g, count) for g, count, _ in split.groups}
        return ShuffleLocations(stages, self._locations(inputs[i] for i in split.others))

    def _stage_holders(self, g: str, count: int) -> StageHolders:
        hit = self._stage_locs.get(g)
        if hit is not None and len(hit.holders) == count:
            return hit
        index: dict[str, int] = {}
        holders: list[list[int]] = []
        get = self.locations.get
        for m in range(count):
            held = get(f"{g}/{m}")
            holders.append([index.setdefault(w, len(index)) for w in held] if held else [])
        hit = self._stage_locs[g] = StageHolders(tuple(index), holders)
        return hit

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
            self._wake_all()

    # -- batches ---------------------------------------------------------------------------
    def prepare(self, b: int) -> None:
        """Plan batch *b* ahead, for :meth:`add_batch` to take when *b* is cut.

        Planning is pure (it reads only the plan and ``first``), and the task records it
        makes are not shared until ``add_batch``, so the batch clock calls this after
        cutting the batch before, outside the coordinator's lock, in the interval's idle
        time: cutting *b* then launches its first tasks without planning them first
        (8,000 tasks at 1,000 workers).
        """
        self._prepared = _planned(b, self.plan.tasks_for_batch(b, self.first))

    def add_batch(self, b: int, now: float) -> list[TaskSpec]:
        """Plan batch *b*; its input blocks are reported with :meth:`block_added`."""
        prepared = self._prepared
        if prepared is not None and prepared.batch <= b:
            self._prepared = None
        if prepared is None or prepared.batch != b:
            prepared = _planned(b, self.plan.tasks_for_batch(b, self.first))
        tasks = prepared.tasks
        self.tasks.update(tasks)
        self._pending.update(tasks)
        # into the launch queue at once (an O(n) heapify when the batch outnumbers it)
        lineage, seq, queue = self.lineage, self._seq, self._queue
        entries = []
        for tid, t in tasks.items():
            t.queued = True
            entries.append((tid not in lineage, b, next(seq), t))
        if len(entries) > len(queue):
            queue.extend(entries)
            heapq.heapify(queue)
        else:
            for entry in entries:
                heapq.heappush(queue, entry)
        for stage, n in prepared.stages.items():
            self._stages[(stage, b)] = (n, {})
        ids = list(tasks)
        self.batches[b] = _Batch(ids, prepared.outputs, now, left=len(ids))
        if not ids:  # nothing to run (a window between slide ends): complete on next tick
            self._empty.append(b)
        return prepared.specs

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
        self._release(w)
        self._set(t, DONE)
        t.duration = now - t0
        stage = self._stages.get((t.spec.stage, t.spec.batch)) if t.member else None
        if stage is not None:
            stage[1][task_id] = t.duration
        if attempt in t.speculative_attempts:
            self.stats.speculative_won += 1
        for a, (ow, _) in t.attempts.items():
            self._release(ow)
            out.append(CancelTask(task_id, ow, a))
        t.attempts.clear()
        if t.spec.kind != "output":
            self.block_added(task_id, worker, size)
        else:
            self.output_owner.setdefault((t.spec.node, t.spec.part), worker)
        batch = self.batches.get(t.spec.batch)
        if batch is not None:
            batch.outputs_left.discard(task_id)
            if not batch.outputs_left and batch.left == 0:
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
        self._release(w)
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
        if len(self.completed) > 2 * KEEP_COMPLETED:
            del self.completed[:-KEEP_COMPLETED]
        if self._max_completed is None or b > self._max_completed:
            self._max_completed = b
        out: list[Instruction] = [BatchCompleted(b)]
        done_upto = self.done_upto()
        # forget finished batches and free what no later batch reads
        for ob in sorted(self.batches):
            if ob > done_upto:
                break
            for x in self.batches.pop(ob).tasks:
                t = self.tasks.pop(x, None)
                if t is not None:
                    t.member = False
                self._pending.pop(x, None)
                self._blocked.pop(x, None)
                self._running.pop(x, None)
        for key in [k for k in self._stages if k[1] <= done_upto]:
            del self._stages[key]
        for skey in [k for k in self._splits if k[1] <= done_upto]:
            del self._splits[skey]
        self._group_checked.clear()
        # blocks of old batches that unfinished work still reads (a rebuilt lineage, the
        # previous state of the next batch) stay, whatever their batch number says; a
        # reduce's map stages are named once each, not walked output by output
        needed: set[str] = set()
        needed_groups: set[str] = set()
        for t in (*self.tasks.values(), *self.lineage.values()):
            if t.status == DONE:
                continue
            inputs = t.spec.inputs
            split = self._split_of(t.spec)
            if split is None:
                needed.update(bid for bid, _ in inputs if block_batch(bid) <= done_upto)
                continue
            if t.spec.batch <= done_upto:
                needed_groups.update(g for g, _, _ in split.groups)
            for i in split.others:
                if block_batch(inputs[i][0]) <= done_upto:
                    needed.add(inputs[i][0])
        for tid in [x for x, t in self.lineage.items() if t.status == DONE]:
            if (
                self.plan.freeable(tid, done_upto)
                and tid not in needed
                and shuffle_group(tid) not in needed_groups
            ):
                del self.lineage[tid]
        floor = self._input_floor(done_upto)
        per_worker: dict[str, list[str]] = {}
        locations, sizes, freeable = self.locations, self.sizes, self.plan.freeable
        held_by = self._held_by
        freed = 0
        for by_batch, upto in ((self._held_inputs, floor), (self._held, done_upto)):
            # retained blocks go a few batches per completion: a checkpoint moves their
            # floor by ``checkpoint_every`` batches at once (tens of thousands of blocks
            # at 1,000 workers), and freeing them all in one completion would stall it
            budget = RETAINED_FREED_PER_BATCH if by_batch is self._held_inputs else None
            for hb in sorted(by_batch):
                if hb > upto or budget == 0:
                    break
                kept: list[str] = []
                for bid in by_batch.pop(hb):
                    holders = locations.get(bid)
                    if holders is None:
                        continue
                    if (
                        not freeable(bid, done_upto)
                        or (needed and bid in needed)
                        or (needed_groups and shuffle_group(bid) in needed_groups)
                    ):
                        kept.append(bid)
                        continue
                    freed += 1
                    del locations[bid]
                    if holders and bid[0] == "s":  # a map output: its stage's count drops
                        self._now_unavailable(bid)
                    for w in holders:
                        ids = per_worker.get(w)
                        if ids is None:
                            per_worker[w] = [bid]
                        else:
                            ids.append(bid)
                        by_w = held_by.get(w)
                        if by_w is not None:
                            by_w.discard(bid)
                    sizes.pop(bid, None)
                if kept:
                    by_batch[hb] = kept
                elif budget is not None:
                    budget -= 1
        if freed:
            for g in [g for g in self._stage_locs if block_batch(g + "/0") <= done_upto]:
                del self._stage_locs[g]
        for w, ids in sorted(per_worker.items()):
            ids.sort()
            out.append(FreeBlocks(w, tuple(ids)))
        return out

    def _input_floor(self, done_upto: int) -> int:
        """Input blocks of batches up to this one may be freed (see ``retain_inputs``)."""
        if not self.retain_inputs or not self._stateful_parts:
            return done_upto
        covered = min(self.checkpoints.get(k, self.first - 1) for k in self._stateful_parts)
        return max(min(done_upto, covered), done_upto - self.retain_inputs)

    def done_upto(self) -> int:
        """Every batch up to this one is complete (batches complete out of order)."""
        pending = [b for b, batch in self.batches.items() if batch.outputs_left or batch.left]
        if pending:
            return min(pending) - 1
        return self.first - 1 if self._max_completed is None else self._max_completed

    # -- launching -------------------------------------------------------------------------
    def tick(self, now: float, limit: int | None = None) -> list[Instruction]:
        """Launch ready tasks into free slots (locality first), then speculative copies.

        Costs O(tasks looked at x log pending): tasks come off a queue in launch order
        (recovery first, then older batches) until no slot is free, so a tick after each
        finished task does not walk every pending task. With *limit*, it returns after
        that many launches (no speculation then): the caller sends them and ticks again,
        so the first tasks of a batch go out while the rest are placed (at 1,000 workers
        the first tick places 2,000).
        """
        out: list[Instruction] = []
        while self._empty:
            out.extend(self._complete(self._empty.pop(0)))
        free = self._free
        if not free.any():
            return out
        if (self.suspects or self._avoid) and now >= self._suspects_expire:
            for gone in [x for x, until in self.suspects.items() if until <= now]:
                del self.suspects[gone]
            self._avoid = frozenset(self.suspects)
            free.avoid(self._avoid)
            self._suspects_expire = min(self.suspects.values(), default=float("inf"))
        queue = self._queue
        later: list[_Task] = []  # pending, but not now (backoff, output order, busy home)
        stopped = False
        while queue:
            t = heapq.heappop(queue)[3]
            t.queued = False
            if t.status != PENDING or t.blocked or self._pending.get(t.spec.id) is not t:
                continue
            if t.not_before > now or (
                t.spec.kind == "output" and self._earlier_output_pending(t.spec)
            ):
                later.append(t)
                continue
            missing, groups, lost = self._missing_inputs(t)
            t.parked_at_loss = -1
            if missing or groups:
                # every lost input at once, so that recovery of all of them (other
                # partitions, other batches) starts in parallel; then park the task
                if lost:
                    out.extend(self._recompute(lost))
                self._block(t, missing, groups)
                continue
            if t.spec.kind == "output":
                # output partitions are pinned to one worker: its transactional producer
                # stays warm and no other worker fences it; moved only when it is lost
                home = self._output_home(t.spec)
                if free.get(home, 0) <= 0:
                    # back in the queue when that worker frees a slot (not every tick)
                    self._home_waiters.setdefault(home, []).append(t)
                    continue
                w: str | None = home
            else:
                w = self._pick_worker(t.spec, free)
            if w is None:
                later.append(t)
                stopped = True
                break
            out.append(self._launch(t, w, now, speculative=False))
            if limit is not None:
                limit -= 1
                if limit <= 0:
                    stopped = True
                    break
        for t in later:
            self._enqueue(t)
        if stopped:
            return out
        if self.speculation and now - self._last_speculation >= SPECULATION_EVERY_S:
            self._last_speculation = now
            out.extend(self._speculate(now, free))
        return out

    def _missing_inputs(self, t: _Task) -> tuple[list[str], list[tuple[str, int]], list[str]]:
        """A pending task's missing input blocks, missing map stages and lost blocks.

        A reduce's map outputs are checked per map stage (a counter of available outputs),
        and only walked, once per stage and loss, to find lost ones. An input whose task is
        pending or running is on its way, not lost.
        """
        missing: list[str] = []
        groups: list[tuple[str, int]] = []
        lost: list[str] = []
        if t.awaiting == 0 and t.parked_at_loss == self._losses:
            return missing, groups, lost  # woken with everything it awaited, nothing lost
        locs, tasks, lineage = self.locations, self.tasks, self.lineage
        ckpt = bool(self.checkpoints)
        inputs = t.spec.inputs
        split = self._split_of(t.spec)
        if split is None:
            others: Iterable[tuple[str, int]] = inputs
        else:
            others = [inputs[i] for i in split.others]
            for g, count, _ in split.groups:
                if self._avail.get(g, 0) >= count:
                    continue
                groups.append((g, count))
                if self._group_checked.get(g) != self._losses:
                    self._group_checked[g] = self._losses
                    lost.extend(self._lost_in_group(g, count))
        for bid, _ in others:
            if locs.get(bid) or (ckpt and self._checkpointed(bid)):
                continue
            missing.append(bid)
            p = tasks.get(bid) or lineage.get(bid)
            if p is None or p.status == DONE:
                lost.append(bid)
        return missing, groups, lost

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
            # outputs waiting for a slot on the slow worker look at their home again
            for t in self._home_waiters.pop(slow, ()):
                self._enqueue(t)

    def _launch(self, t: _Task, w: str, now: float, speculative: bool) -> LaunchTask:
        a = t.next_attempt
        t.next_attempt += 1
        t.attempts[a] = (w, now)
        self._set(t, RUNNING)
        self._free.take(w)
        self.stats.launched += 1
        batch = self.batches.get(t.spec.batch)
        if batch is not None and batch.first_launch is None:
            batch.first_launch = now
        return LaunchTask(t.spec, w, a, speculative)

    def _pick_worker(
        self, spec: TaskSpec, free: SlotIndex, exclude: Iterable[str] = ()
    ) -> str | None:
        """The free worker holding most input bytes; else the one with most free slots.

        Ties go to more free slots, then to the first worker by name (deterministic).
        Workers caught straggling are passed over while any other worker is free.
        Costs O(holders of the inputs), plus O(log workers) when no holder is free.
        """
        ex = set(exclude)
        if self._avoid:
            w = self._pick_among(spec, free, ex | self._avoid, avoided=False)
            if w is not None:
                return w
        return self._pick_among(spec, free, ex)

    def _pick_among(
        self, spec: TaskSpec, free: SlotIndex, ex: set[str], avoided: bool = True
    ) -> str | None:
        if len(spec.inputs) == 1:  # a map task over one input block: the common case
            best: str | None = None
            most = 0
            for w in self.locations.get(spec.inputs[0][0], ()):
                f = free.get(w, 0)
                if (
                    f > most or (f == most and f > 0 and best is not None and w < best)
                ) and w not in ex:
                    best, most = w, f
            return best if best is not None else free.best(ex, avoided)
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
        return free.best(ex, avoided)

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
            self._enqueue(t)
            self.stats.recomputed += 1
        elif t.status == DONE:
            self._set(t, PENDING)  # its block was lost: run it again
            self.stats.recomputed += 1
        else:
            return  # pending or running: the block is on its way, not lost
        inputs = t.spec.inputs
        split = self._split_of(t.spec)
        if split is None:
            for ibid, _ in inputs:
                self._ensure(ibid, out, seen)
            return
        # a reduce: each map stage is walked once, however many reduces read it
        for g, count, _ in split.groups:
            if g in seen:
                continue
            seen.add(g)
            for m in range(count):
                self._ensure(f"{g}/{m}", out, seen)
        for i in split.others:
            self._ensure(inputs[i][0], out, seen)

    def _spec_for(self, bid: str) -> TaskSpec | None:
        return self.plan.task_for(bid, self.first)

    def _speculate(self, now: float, free: SlotIndex) -> list[Instruction]:
        """Copies of running tasks past ``multiplier`` x their stage's median.

        Walks the running tasks only (at most the fleet's slots), with each stage's
        finished durations kept as tasks finish.
        """
        out: list[Instruction] = []
        thresholds: dict[tuple[str, int], float | None] = {}
        for t in list(self._running.values()):
            if t.status != RUNNING or t.speculated or len(t.attempts) != 1 or not t.member:
                continue
            key = (t.spec.stage, t.spec.batch)
            if key in thresholds:
                threshold = thresholds[key]
            else:
                threshold = thresholds[key] = self._straggler_threshold(key)
            if threshold is None:
                continue
            ((w, t0),) = t.attempts.values()
            if now - t0 <= threshold:
                continue
            self.suspects[w] = now + SUSPECT_SECONDS
            self._suspects_expire = now  # the next tick refreshes the set avoided
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

    def _straggler_threshold(self, key: tuple[str, int]) -> float | None:
        """Run time past which a task of (stage, batch) is a straggler; None: too early."""
        stage = self._stages.get(key)
        if stage is None:
            return None
        n, done = stage
        if n < 2 or len(done) < self.quantile * n:
            return None
        return max(self.min_straggler_seconds, self.multiplier * statistics.median(done.values()))

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

    def running_longer_than(self, now: float, age_s: float) -> set[str]:
        """Workers with a task attempt running for more than *age_s* at *now*.

        Walks the running tasks only (at most the fleet's slots): the liveness probe's
        candidates (a paused worker holds its attempts until something notices).
        """
        cutoff = now - age_s
        return {w for t in self._running.values() for w, t0 in t.attempts.values() if t0 < cutoff}

    def running_count(self) -> int:
        """Task attempts running now (over all workers)."""
        return sum(self.busy.values())

    def idle(self) -> bool:
        return not self.batches
