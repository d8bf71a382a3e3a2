"""The coordinator <-> worker wire protocol: one frozen dataclass per message.

Every RPC is ``call(method, params)`` on :mod:`ops.rpc`; ``params`` is the message's
:meth:`to_wire` (a msgpack-friendly dict, keyed by field name) and the handler decodes it
with :meth:`from_wire`. Calls a coordinator makes to a worker carry the leader's epoch
beside the message fields (:data:`EPOCH`), which the worker checks before decoding.

Worker -> coordinator::

    register       Register          -> RegisterReply
    heartbeat      Heartbeat         -> HeartbeatAnswer ("ok" | "unknown")
    task_done      TaskDone          -> True
    task_failed    TaskFailed        -> True   (kind: FailureKind, not a string prefix)
    request_commit RequestCommit     -> CommitAnswer ("granted" | "denied" | "wait")
    checkpointed   Checkpointed      -> True
    status         Status            -> dict   (also asked by ``dstream status``)
    query          Query             -> dict   (``dstream query``: a named stream's state)

Coordinator -> worker (each with the epoch)::

    seal           Seal              -> list[BlockReport]
    assign         Assign            -> True   (PartitionAssignment per input partition)
    launch         Launch            -> True
    read_input     ReadInput         -> int    (size of the rebuilt block)
    replicate_to   ReplicateTo       -> int    (size of the copied block)
    free           Free              -> int    (blocks left in the store)
    cancel         Cancel            -> True
    query_part     QueryPartition    -> dict   (one state partition's selected entries)
    finish         Finish            -> True   (a bounded run is done: the worker exits 0)
    await_load     AwaitLoad         -> list[TableLoad] (a fresh app's tables, before batch 0)

Worker -> worker::

    fetch          Fetch             -> bytes
    replicate      Replicate         -> True

Both sides are upgraded together: the format is compatible within one version only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engine.executor import DeadLetter
from engine.plan import ShuffleInputs, TaskSpec
from engine.scheduler import ShuffleLocations, StageHolders
from state.metalog import OffsetRange

#: Name of the leader's epoch in the params of every coordinator -> worker call.
EPOCH = "epoch"

#: A method -> handler table: each handler takes the raw params and returns the wire reply.
Handlers = dict[str, Callable[[Any], Any]]


class CommitAnswer(StrEnum):
    """The coordinator's answer to ``request_commit`` (the values are the wire strings)."""

    GRANTED = "granted"  # this attempt holds the (batch, output partition) commit right
    DENIED = "denied"  # another attempt holds it, or the worker was declared lost
    WAIT = "wait"  # an earlier batch of the partition is still committing; ask again


class HeartbeatAnswer(StrEnum):
    """The coordinator's answer to a heartbeat."""

    OK = "ok"
    UNKNOWN = "unknown"  # declared lost, or a new leader: register again


class FailureKind(StrEnum):
    """Why a task attempt failed; decides what the coordinator does next."""

    ERROR = "error"  # any other failure: the task is retried
    MISSING_INPUT = "missing_input"  # an input block is gone: rebuild it, then retry
    FENCED = "fenced"  # another attempt or a newer leader owns the output: retry is safe
    APP_FAILED = "app_failed"  # a user function raised under fail_on_error: the app stops
    METADATA_LOST = "metadata_lost"  # Redis lost the app's metadata: the coordinator exits


# -- worker -> coordinator ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Register:
    """A worker joins (or rejoins, with the blocks it still holds)."""

    worker: str  # its advertised RPC address, also its id
    slots: int
    blocks: list[str] = field(default_factory=list)
    http_port: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "slots": self.slots,
            "blocks": self.blocks,
            "http_port": self.http_port,
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Register:
        return cls(w["worker"], w["slots"], list(w.get("blocks", [])), w.get("http_port", 0))


@dataclass(frozen=True, slots=True)
class RegisterReply:
    """What a worker needs to build the plan: the leader's epoch, first batch, layout.

    *incarnation* is the app's incarnation id, which the Kafka sink writes into (and checks
    in) its commit markers.
    """

    epoch: int
    first: int
    #: source node -> its input partitions as (topic, partition); topic "" for a queue
    layout: dict[int, list[tuple[str, int]]]
    interval_ms: int
    incarnation: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "first": self.first,
            "layout": {str(k): [list(tp) for tp in v] for k, v in self.layout.items()},
            "interval_ms": self.interval_ms,
            "incarnation": self.incarnation,
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> RegisterReply:
        layout = {int(k): [(str(t), int(p)) for t, p in v] for k, v in w["layout"].items()}
        return cls(w["epoch"], w["first"], layout, w["interval_ms"], w.get("incarnation", ""))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A worker is alive; with its store size and receiver lag (status, metrics)."""

    worker: str
    store_bytes: int = 0
    blocks: int = 0
    received: int = 0
    lag: dict[tuple[str, int], int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "store_bytes": self.store_bytes,
            "blocks": self.blocks,
            "received": self.received,
            "lag": [[t, p, n] for (t, p), n in self.lag.items()],
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Heartbeat:
        return cls(
            w["worker"],
            w.get("store_bytes", 0),
            w.get("blocks", 0),
            w.get("received", 0),
            {(t, p): n for t, p, n in w.get("lag", [])},
        )


@dataclass(frozen=True, slots=True)
class TaskDone:
    """An attempt finished (an output task: after its commit)."""

    task: str
    attempt: int
    worker: str
    size: int = 0  # bytes of the block it stored (0 for an output task)
    input_records: int = 0
    dead: int = 0  # records dead-lettered
    seconds: float = 0.0
    #: the attempt's dead letters (each value bounded by ``dead_letter_max_bytes``); the
    #: coordinator commits those of a task's first accepted attempt, once per batch
    letters: list[DeadLetter] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "attempt": self.attempt,
            "worker": self.worker,
            "size": self.size,
            "input_records": self.input_records,
            "dead": self.dead,
            "seconds": self.seconds,
            "letters": [letter_to_wire(d) for d in self.letters],
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> TaskDone:
        return cls(
            w["task"],
            w["attempt"],
            w["worker"],
            w.get("size", 0),
            w.get("input_records", 0),
            w.get("dead", 0),
            w.get("seconds", 0.0),
            [letter_from_wire(d) for d in w.get("letters", ())],
        )


def letter_to_wire(d: DeadLetter) -> dict[str, Any]:
    """A dead letter as a msgpack-friendly dict, keyed by field name."""
    return {
        "topic": d.topic,
        "partition": d.partition,
        "offset": d.offset,
        "operator": d.operator,
        "error": d.error,
        "value": d.value,
        "original_size": d.original_size,
    }


def letter_from_wire(w: dict[str, Any]) -> DeadLetter:
    return DeadLetter(
        str(w["topic"]),
        int(w["partition"]),
        int(w["offset"]),
        str(w["operator"]),
        str(w["error"]),
        bytes(w["value"]),
        int(w.get("original_size", 0)),
    )


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """An attempt failed; *kind* says why (no parsing of *error*, which is for people)."""

    task: str
    attempt: int
    worker: str
    error: str
    kind: FailureKind = FailureKind.ERROR
    missing: str | None = None  # the input block it could not find (MISSING_INPUT)
    gone_from: list[str] = field(default_factory=list)  # holders that had no good copy

    def to_wire(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "attempt": self.attempt,
            "worker": self.worker,
            "error": self.error,
            "kind": self.kind.value,
            "missing": self.missing,
            "gone_from": self.gone_from,
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> TaskFailed:
        return cls(
            w["task"],
            w["attempt"],
            w["worker"],
            str(w.get("error", "")),
            FailureKind(w.get("kind", FailureKind.ERROR.value)),
            w.get("missing"),
            list(w.get("gone_from") or []),
        )


@dataclass(frozen=True, slots=True)
class RequestCommit:
    """An output attempt asks for its (batch, output partition) commit right."""

    task: str
    attempt: int
    worker: str

    def to_wire(self) -> dict[str, Any]:
        return {"task": self.task, "attempt": self.attempt, "worker": self.worker}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> RequestCommit:
        return cls(w["task"], w["attempt"], w["worker"])


@dataclass(frozen=True, slots=True)
class Checkpointed:
    """State partition (node, part) at *batch* is fully written to the checkpoint store."""

    node: int
    part: int
    batch: int
    bytes: int = 0
    seconds: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "part": self.part,
            "batch": self.batch,
            "bytes": self.bytes,
            "seconds": self.seconds,
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Checkpointed:
        return cls(w["node"], w["part"], w["batch"], w.get("bytes", 0), w.get("seconds", 0.0))


@dataclass(frozen=True, slots=True)
class Status:
    """Ask a coordinator for its status (no fields); the reply is a plain dict."""

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, _w: Any) -> Status:
        return cls()


@dataclass(frozen=True, slots=True)
class Query:
    """Read a named stream's state (``dstream query``); the reply is a plain dict.

    *keys* selects entries by key text; without keys, a scan of the keys starting with
    *prefix*, at most *limit* (None: the default). *app* must be the coordinator's app.
    """

    app: str
    stream: str
    keys: list[str] = field(default_factory=list)
    prefix: str = ""
    limit: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "stream": self.stream,
            "keys": list(self.keys),
            "prefix": self.prefix,
            "limit": self.limit,
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Query:
        return cls(
            str(w["app"]),
            str(w["stream"]),
            [str(k) for k in w.get("keys") or []],
            str(w.get("prefix") or ""),
            w.get("limit"),
        )


# -- coordinator -> worker ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Seal:
    """Cut batch *batch*'s blocks, replicate each to a peer, report them."""

    batch: int
    max_records: int | None = None  # the rate controller's per-partition cap (None: keep)

    def to_wire(self) -> dict[str, Any]:
        return {"batch": self.batch, "max_records": self.max_records}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Seal:
        return cls(w["batch"], w.get("max_records"))


@dataclass(frozen=True, slots=True)
class BlockReport:
    """One sealed input block: its offset range, size and the workers holding a copy."""

    block: str
    range: OffsetRange
    size: int
    holders: list[str]

    def to_wire(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "range": list(self.range),
            "size": self.size,
            "holders": self.holders,
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> BlockReport:
        return cls(w["block"], OffsetRange(*w["range"]), w["size"], list(w["holders"]))


@dataclass(frozen=True, slots=True)
class PartitionAssignment:
    """Input partition *index* of source *node* (Kafka *topic*/*partition*) from *start*."""

    node: int
    index: int
    topic: str  # "" for a queue source
    partition: int
    start: int  # next offset to read
    stop: int | None = None  # a bounded run reads no offset at or past it (exclusive)
    #: a table partition of a fresh app: the first block reads at least up to this offset
    #: (exclusive; the topic's end when the app started), whatever the record cap
    load_until: int | None = None

    def to_wire(self) -> dict[str, Any]:
        w: dict[str, Any] = {
            "node": self.node,
            "index": self.index,
            "topic": self.topic,
            "partition": self.partition,
            "start": self.start,
        }
        if self.stop is not None:
            w["stop"] = self.stop
        if self.load_until is not None:
            w["load_until"] = self.load_until
        return w

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> PartitionAssignment:
        return cls(
            w["node"],
            w["index"],
            w["topic"],
            w["partition"],
            w["start"],
            w.get("stop"),
            w.get("load_until"),
        )


@dataclass(frozen=True, slots=True)
class Assign:
    """The worker's whole set of input partitions (replaces the previous one)."""

    parts: list[PartitionAssignment]
    peers: list[str]  # replica targets, in order of preference
    max_records: int | None = None

    def to_wire(self) -> dict[str, Any]:
        w: dict[str, Any] = {"parts": [p.to_wire() for p in self.parts], "peers": self.peers}
        if self.max_records is not None:
            w["max_records"] = self.max_records
        return w

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Assign:
        parts = [PartitionAssignment.from_wire(p) for p in w["parts"]]
        return cls(parts, list(w.get("peers", [])), w.get("max_records"))


@dataclass(frozen=True, slots=True)
class AwaitLoad:
    """Wait up to *wait_s* seconds for the worker's table partitions to load; report them.

    Asked by a fresh app's leader before its first batch (:mod:`ops.coordinator.tables`);
    answered with a :class:`TableLoad` for every partition assigned with a ``load_until``.
    """

    wait_s: float

    def to_wire(self) -> dict[str, Any]:
        return {"wait_s": self.wait_s}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> AwaitLoad:
        return cls(float(w["wait_s"]))


@dataclass(frozen=True, slots=True)
class TableLoad:
    """A receiver's progress in loading one table partition: loaded once position >= until."""

    topic: str
    partition: int
    position: int  # next offset to read
    until: int  # the partition's ``load_until``

    def to_wire(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "position": self.position,
            "until": self.until,
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> TableLoad:
        return cls(w["topic"], w["partition"], w["position"], w["until"])


def task_spec_to_wire(s: TaskSpec) -> list[Any]:
    """A task spec as msgpack packs it: one array in the dataclass' field order.

    A reduce's inputs go as its map stages (``[[stage, count], ...]``) plus its other
    inputs, not one pair per map output (:class:`engine.plan.ShuffleInputs`): at 1,000
    workers that is a few dozen bytes instead of tens of kilobytes per reduce.
    """
    inputs = s.inputs
    if isinstance(inputs, ShuffleInputs):
        shuffle = [list(x) for x in inputs.stages]
        return [s.id, s.kind, s.node, s.side, s.batch, s.part, inputs.others, s.stage, shuffle]
    return [s.id, s.kind, s.node, s.side, s.batch, s.part, inputs, s.stage]


def task_spec_from_wire(w: Any) -> TaskSpec:
    """Inverse of :func:`task_spec_to_wire`."""
    tid, kind, node, side, batch, part, inputs, stage, *rest = w
    pairs = tuple((str(b), int(k)) for b, k in inputs)
    if rest:
        stages = tuple((str(g), int(c)) for g, c in rest[0])
        return TaskSpec(
            tid, kind, node, side, batch, part, ShuffleInputs(stages, int(part), pairs), stage
        )
    return TaskSpec(tid, kind, node, side, batch, part, pairs, stage)


@dataclass(frozen=True, slots=True)
class Launch:
    """Run one attempt of a task.

    *locations* names the holders of each input block (a worker address or the checkpoint
    store); a reduce's come as a :class:`engine.scheduler.ShuffleLocations` and travel as
    its map stages' holder tables (``stages``: per stage, the msgpack bytes of its hosts
    and, per map output, indexes into them, encoded once per stage) plus its other inputs'
    holders. *ranges* the logged
    ``(start, until)`` of each input block, against which a copy is checked (stale copies
    exist); *time_ms* is the batch time the sinks stamp.
    """

    spec: TaskSpec
    attempt: int
    locations: Mapping[str, list[str]]
    ranges: dict[str, tuple[int, int]]
    time_ms: int

    def to_wire(self) -> dict[str, Any]:
        locs = self.locations
        w: dict[str, Any] = {
            "spec": task_spec_to_wire(self.spec),
            "attempt": self.attempt,
            "ranges": {b: list(r) for b, r in self.ranges.items()},
            "time_ms": self.time_ms,
        }
        if isinstance(locs, ShuffleLocations):
            w["locations"] = locs.others
            w["stages"] = {g: st.packed() for g, st in locs.stages.items()}
        else:
            w["locations"] = locs
        return w

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Launch:
        ranges = {b: (int(r[0]), int(r[1])) for b, r in (w.get("ranges") or {}).items()}
        locs: Mapping[str, list[str]] = {b: list(h) for b, h in w["locations"].items()}
        stages = w.get("stages")
        if stages:
            locs = ShuffleLocations(
                {str(g): StageHolders.unpacked(data) for g, data in stages.items()}, dict(locs)
            )
        return cls(task_spec_from_wire(w["spec"]), w["attempt"], locs, ranges, w.get("time_ms", 0))


@dataclass(frozen=True, slots=True)
class ReadInput:
    """Rebuild lost input block *block* from Kafka by its logged range (or its queue)."""

    block: str
    range: OffsetRange

    def to_wire(self) -> dict[str, Any]:
        return {"block": self.block, "range": list(self.range)}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> ReadInput:
        return cls(w["block"], OffsetRange(*w["range"]))


@dataclass(frozen=True, slots=True)
class ReplicateTo:
    """Copy block *block* to the worker *target* (re-replication after a loss)."""

    block: str
    target: str

    def to_wire(self) -> dict[str, Any]:
        return {"block": self.block, "target": self.target}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> ReplicateTo:
        return cls(w["block"], w["target"])


@dataclass(frozen=True, slots=True)
class Free:
    """Drop blocks nothing needs any more (idempotent)."""

    blocks: list[str]

    def to_wire(self) -> dict[str, Any]:
        return {"blocks": self.blocks}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Free:
        return cls(list(w["blocks"]))


@dataclass(frozen=True, slots=True)
class Cancel:
    """Abandon an attempt (another one won): it must not commit or report."""

    task: str
    attempt: int

    def to_wire(self) -> dict[str, Any]:
        return {"task": self.task, "attempt": self.attempt}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Cancel:
        return cls(w["task"], w["attempt"])


@dataclass(frozen=True, slots=True)
class Finish:
    """A bounded run finished: the worker stops and exits 0 (a finished Spark job's executors)."""

    records: int
    batches: int

    def to_wire(self) -> dict[str, Any]:
        return {"records": self.records, "batches": self.batches}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Finish:
        return cls(w["records"], w["batches"])


@dataclass(frozen=True, slots=True)
class QueryPartition:
    """Select from partition *part* of queryable node *node* at *batch* (a :class:`Query`).

    *locations* names the holders of the blocks it reads (as a task's do); *limit* is the
    resolved scan limit.
    """

    node: int
    batch: int
    part: int
    locations: dict[str, list[str]]
    keys: list[str]
    prefix: str
    limit: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "batch": self.batch,
            "part": self.part,
            "locations": self.locations,
            "keys": self.keys,
            "prefix": self.prefix,
            "limit": self.limit,
        }

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> QueryPartition:
        return cls(
            w["node"],
            w["batch"],
            w["part"],
            {str(k): list(v) for k, v in w["locations"].items()},
            list(w["keys"]),
            w["prefix"],
            w["limit"],
        )


# -- worker -> worker ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Fetch:
    """Read a block (or one bucket of a shuffle block; -1: the whole block)."""

    block: str
    bucket: int = -1

    def to_wire(self) -> dict[str, Any]:
        return {"block": self.block, "bucket": self.bucket}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Fetch:
        return cls(w["block"], w.get("bucket", -1))


@dataclass(frozen=True, slots=True)
class Replicate:
    """Store a copy of a block (input blocks replace an older copy: it may be stale)."""

    block: str
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"block": self.block, "data": self.data}

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Replicate:
        return cls(w["block"], w["data"])


#: Method name of each message (the RPC ``method``).
METHODS: dict[type, str] = {
    Register: "register",
    Heartbeat: "heartbeat",
    TaskDone: "task_done",
    TaskFailed: "task_failed",
    RequestCommit: "request_commit",
    Checkpointed: "checkpointed",
    Status: "status",
    Query: "query",
    Seal: "seal",
    Assign: "assign",
    Launch: "launch",
    ReadInput: "read_input",
    ReplicateTo: "replicate_to",
    Free: "free",
    Cancel: "cancel",
    Finish: "finish",
    QueryPartition: "query_part",
    AwaitLoad: "await_load",
    Fetch: "fetch",
    Replicate: "replicate",
}

#: Calls only a coordinator makes; each carries its epoch, and a worker refuses an older one.
COORDINATOR_CALLS = frozenset(
    METHODS[m]
    for m in (
        Launch,
        Seal,
        Assign,
        Free,
        Cancel,
        ReadInput,
        ReplicateTo,
        Finish,
        QueryPartition,
        AwaitLoad,
    )
)


def method_of(msg: Any) -> str:
    """The RPC method that carries *msg*."""
    return METHODS[type(msg)]
