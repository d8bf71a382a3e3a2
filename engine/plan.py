"""Planning: the graph becomes, per batch, tasks over named immutable blocks.

Pure and deterministic: the same graph, source partition counts and batch give the same
tasks in every process. Nothing here does I/O.

Block ids (``until`` offsets are exclusive everywhere):

* ``in/{node}/{b}/{p}``: input block of source ``node``, batch ``b``, source partition ``p``
  (one Kafka topic-partition), sealed by a receiver;
* ``sh/{node}/{side}/{b}/{m}``: map-side shuffle output of map partition ``m`` of input
  ``side`` of keyed operator ``node``, split into buckets, one per reduce partition;
* ``rd/{node}/{b}/{p}``: a materialized partition (keyed operator output, persisted stream,
  state partition, window combination);
* ``out/{node}/{b}/{p}``: an output task; it produces no block, it commits.

Narrow operators are fused: a task reads boundary blocks and runs the chain of narrow
operators over them. A node is a boundary when it shuffles, holds state, is consumed by a
window, or is consumed more than once (so its user functions run, and dead-letter, once).

Public: the coordinator and the worker compile the app's graph into the same :class:`Plan`,
the worker runs its :class:`TaskSpec` s, and block ids are parsed with :func:`block_node`
and :func:`block_batch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from engine.errors import GraphError
from engine.graph import Node, is_stream_name

NARROW = frozenset({"map", "flat_map", "filter", "map_values", "flat_map_values"})
SHUFFLE = frozenset(
    {"reduce_by_key", "group_by_key", "cogroup", "join", "repartition", "count", "reduce", "state"}
)
#: keyed operators whose map side buckets by the hash of the record's key
KEYED = frozenset({"reduce_by_key", "group_by_key", "cogroup", "join", "state"})

InputRef = tuple[str, int]  # (block id, shuffle bucket, or -1 for the whole block)


class ShuffleInputs(Sequence[InputRef]):
    """A reduce task's inputs, named by map stage: O(stages) to build, send and compare.

    It reads bucket ``bucket`` of every output ``{stage}/0`` .. ``{stage}/{count - 1}`` of
    each map stage in ``stages``, in that order, then the blocks in ``others`` (the
    previous state partition, a table's partition). As a sequence it is exactly those
    ``(block id, bucket)`` pairs, so code that walks a task's inputs need not know; the
    planner and the coordinator use ``stages`` and never list the map outputs (at 1,000
    workers a batch's reduces would otherwise name 5 M of them), as Spark's
    ``ShuffleDependency`` names a shuffle rather than its map outputs.
    """

    __slots__ = ("_n", "bucket", "others", "stages")

    def __init__(
        self, stages: tuple[tuple[str, int], ...], bucket: int, others: tuple[InputRef, ...] = ()
    ) -> None:
        self.stages = stages
        self.bucket = bucket
        self.others = others
        self._n = sum(c for _, c in stages) + len(others)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[InputRef]:
        bucket = self.bucket
        for g, count in self.stages:
            for m in range(count):
                yield (f"{g}/{m}", bucket)
        yield from self.others

    @overload
    def __getitem__(self, i: int) -> InputRef: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[InputRef, ...]: ...
    def __getitem__(self, i: int | slice) -> InputRef | tuple[InputRef, ...]:
        if isinstance(i, slice):
            return tuple(self)[i]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        for g, count in self.stages:
            if i < count:
                return (f"{g}/{i}", self.bucket)
            i -= count
        return self.others[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShuffleInputs):
            return (self.stages, self.bucket, self.others) == (
                other.stages,
                other.bucket,
                other.others,
            )
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == self._n and all(
                a == tuple(b) for a, b in zip(self, other, strict=True)
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.stages, self.bucket, self.others))

    def __repr__(self) -> str:
        return f"ShuffleInputs({self.stages!r}, {self.bucket!r}, {self.others!r})"


@dataclass(frozen=True)
class TaskSpec:
    """One stateless, deterministic task: a pure function of its named input blocks.

    Attributes:
        id: the task's name; for ``map`` and ``result`` tasks also the id of the block it
            produces. Re-running a task gives a byte-identical block.
        kind: ``map`` (shuffle map side), ``result`` (a materialized partition) or
            ``output`` (a sink partition, committed once under the commit right).
        node: id of the node the task belongs to.
        side: for ``map`` tasks, which input of the node (join sides); else 0.
        batch: batch index (batch time = batch * interval).
        part: partition index.
        inputs: blocks read, as (block id, bucket); bucket -1 reads the whole block. A
            reduce's are a :class:`ShuffleInputs` (its map stages, not their outputs).
        stage: tasks of one stage share it; speculation compares a task with its stage.

    """

    id: str
    kind: str
    node: int
    side: int
    batch: int
    part: int
    inputs: Sequence[InputRef]
    stage: str


def block_batch(block_id: str) -> int:
    """The batch index named in a block id."""
    parts = block_id.split("/")
    return int(parts[3] if parts[0] == "sh" else parts[2])


def block_node(block_id: str) -> int:
    """The graph node named in a block id."""
    return int(block_id.split("/")[1])


def block_part(block_id: str) -> int:
    """The partition (or map task, for a shuffle block) named last in a block id."""
    return int(block_id.rsplit("/", 1)[1])


def input_block_id(node: int, batch: int, index: int) -> str:
    """The id of source *node*'s input block of *batch* for input partition *index*."""
    return f"in/{node}/{batch}/{index}"


class Plan:
    """The compiled graph: boundaries, partition counts, periods and block retention.

    Args:
        nodes: the graph, in creation order (as built by ``build(ssc)``).
        source_partitions: partition count of each source node (Kafka topic-partitions).

    """

    def __init__(self, nodes: Sequence[Node], source_partitions: dict[int, int]) -> None:
        self.nodes: list[Node] = list(nodes)
        self._expand_window_reduce()
        self.by_id: dict[int, Node] = {n.id: n for n in self.nodes}
        self.consumers: dict[int, list[Node]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for p in n.parents:
                self.consumers[p.id].append(n)
        self.nparts: dict[int, int] = {}
        self.period: dict[int, int] = {}
        self.boundary: set[int] = set()
        for n in self.nodes:
            self._derive(n, source_partitions)
        self.keep: dict[int, int] = self._retention()
        self.outputs = [n for n in self.nodes if n.kind == "output"]

    # -- compile ---------------------------------------------------------------------------
    def _expand_window_reduce(self) -> None:
        """Split ``window_reduce`` into a per-batch keyed reduce and a window combination."""
        extra: list[Node] = []
        next_id = max((n.id for n in self.nodes), default=-1) + 1
        remap: dict[int, Node] = {}
        for n in self.nodes:
            parents = tuple(remap.get(p.id, p) for p in n.parents)
            if n.kind == "window_reduce":
                red = Node(
                    id=next_id,
                    kind="reduce_by_key",
                    parents=parents,
                    args={"fn": n.args["fn"], "num_partitions": n.args["num_partitions"]},
                    name=f"{n.name}.reduce",
                )
                next_id += 1
                extra.append(red)
                new = Node(id=n.id, kind="window_combine", parents=(red,), args=n.args, name=n.name)
            elif parents != n.parents:
                new = Node(id=n.id, kind=n.kind, parents=parents, args=n.args, name=n.name)
            else:
                continue
            remap[n.id] = new
        self.nodes = [remap.get(n.id, n) for n in self.nodes] + extra
        self.nodes.sort(key=lambda n: self._depth(n))

    @staticmethod
    def _depth(n: Node) -> int:
        return 0 if not n.parents else 1 + max(Plan._depth(p) for p in n.parents)

    def _derive(self, n: Node, source_partitions: dict[int, int]) -> None:
        k = n.kind
        parents = n.parents
        # a join with a table (engine.tables) takes the stream's slide: tables emit every batch
        pp = [self.period[p.id] for p in (parents[:1] if n.args.get("table") else parents)]
        if len(set(pp)) > 1:
            msg = (
                f"{n.name}: inputs have different slide intervals ({pp} batches); "
                "union, join and cogroup need streams with the same slide"
            )
            raise GraphError(msg)
        period = pp[0] if pp else 1
        if k == "source":
            if n.args["source"] == "queue":
                parts = 1
            else:
                parts = source_partitions.get(n.id, 0)
                if parts < 1:
                    msg = f"{n.name}: topics {n.args['topics']} have no partitions"
                    raise GraphError(msg)
            self.boundary.add(n.id)
        elif k in NARROW or k == "snapshot":
            parts = self.nparts[parents[0].id]
        elif k == "union":
            parts = sum(self.nparts[p.id] for p in parents)
        elif k in ("count", "reduce", "transform"):
            parts = 1
            self.boundary.add(n.id)
        elif k in SHUFFLE:
            parts = n.args["num_partitions"]
            self.boundary.add(n.id)
            if k == "join" and n.args.get("table") and self.nparts[parents[1].id] != parts:
                msg = f"{n.name}: a join with a table needs the table's partition count"
                raise GraphError(msg)
        elif k in ("window", "window_combine"):
            w, s = n.args["window"], n.args["slide"]
            if w % period or s % period:
                msg = (
                    f"{n.name}: window={w} and slide={s} batches must be multiples of the "
                    f"input's slide ({period} batches)"
                )
                raise GraphError(msg)
            parts = self.nparts[parents[0].id]
            period = s
            self.boundary.add(parents[0].id)  # windows read persisted blocks of past batches
            if k == "window_combine":
                self.boundary.add(n.id)
        elif k == "output":
            sink = n.args["sink"]
            parts = 1 if sink in ("foreach", "pprint") else self.nparts[parents[0].id]
        else:  # pragma: no cover - the API creates no other kinds
            msg = f"unknown operator kind {k}"
            raise GraphError(msg)
        if k != "output" and len(self.consumers[n.id]) > 1:
            self.boundary.add(n.id)
        self.nparts[n.id] = parts
        self.period[n.id] = period

    def _retention(self) -> dict[int, int]:
        """How many batches after its own a node's blocks are still read."""
        keep = {n.id: 0 for n in self.nodes}
        for n in self.nodes:
            if n.kind == "window":
                self._extend_keep(keep, n.parents[0], n.args["window"] - 1)
            elif n.kind == "window_combine":
                lookback = n.args["window"] - 1
                if n.args.get("inv_fn") is not None:
                    lookback += n.args["slide"]
                    keep[n.id] = max(keep[n.id], n.args["slide"])
                keep[n.parents[0].id] = max(keep[n.parents[0].id], lookback)
            elif n.kind == "state":
                keep[n.id] = max(keep[n.id], self.period[n.id])
            if n.kind in ("window", "window_combine") and is_stream_name(n.name):
                # a named window answers queries (engine.query) as of its last window: its
                # blocks stay until the next window completes, one slide later
                s = n.args["slide"]
                keep[n.id] = max(keep[n.id], s)
                if n.kind == "window":  # read from its input's blocks, unless persisted
                    self._extend_keep(keep, n.parents[0], n.args["window"] - 1 + s)
        return keep

    def _extend_keep(self, keep: dict[int, int], n: Node, lookback: int) -> None:
        """A window over *n* reads the boundary blocks under *n* for *lookback* batches."""
        keep[n.id] = max(keep[n.id], lookback)
        if n.id not in self.boundary:
            for p in n.parents:
                self._extend_keep(keep, p, lookback)

    # -- per batch -------------------------------------------------------------------------
    def emits(self, node_id: int, b: int) -> bool:
        """Whether the node has a dataset at batch *b* (windows only at slide ends)."""
        return (b + 1) % self.period[node_id] == 0

    def window_batches(self, n: Node, lo: int, hi: int, first: int) -> list[int]:
        """Batches in ``(lo, hi]`` where the window's input has data, none before *first*."""
        src = n.parents[0].id
        return [x for x in range(max(lo + 1, first), hi + 1) if self.emits(src, x)]

    def deps(self, n: Node, b: int, p: int, first: int) -> list[InputRef]:
        """The boundary blocks a task reads to produce partition *p* of *n* at batch *b*."""
        if n.id in self.boundary and n.kind != "output":
            if b < first or not self.emits(n.id, b):
                return []
            prefix = "in" if n.kind == "source" else "rd"
            return [(f"{prefix}/{n.id}/{b}/{p}", -1)]
        k = n.kind
        if k in NARROW or k == "snapshot":
            return self.deps(n.parents[0], b, p, first)
        if k == "union":
            for parent in n.parents:
                c = self.nparts[parent.id]
                if p < c:
                    return self.deps(parent, b, p, first)
                p -= c
            return []
        if k == "window":
            return self._window_deps(n, b, p, first)
        msg = f"no dependency rule for {n.name}"  # pragma: no cover
        raise GraphError(msg)

    def all_deps(self, n: Node, b: int, first: int) -> list[InputRef]:
        out: list[InputRef] = []
        for p in range(self.nparts[n.id]):
            out.extend(self.deps(n, b, p, first))
        return out

    def tasks_for_batch(self, b: int, first: int) -> list[TaskSpec]:
        """Every task of batch *b*, in a valid order (a task after the tasks it reads).

        Args:
            b: the batch index.
            first: the app's first batch; blocks of earlier batches are empty.

        """
        tasks: list[TaskSpec] = []
        for n in self.nodes:
            if n.kind == "source" or not self.emits(n.id, b):
                continue
            k = n.kind
            if n.id in self.boundary and k in SHUFFLE:
                tasks.extend(self._shuffle_tasks(n, b, first))
            elif k in ("transform", "window_combine") or (
                n.id in self.boundary and k not in ("output",)
            ):
                tasks.extend(self._result_tasks(n, b, first))
            elif k == "output":
                tasks.extend(self._output_tasks(n, b, first))
        return tasks

    def _shuffle_tasks(self, n: Node, b: int, first: int) -> list[TaskSpec]:
        tasks = [
            self._map_task(n, side, b, m, first)
            for side, parent in enumerate(self._map_sides(n))
            for m in range(self.nparts[parent.id])
        ]
        stages = self._map_stages(n, b)
        tasks.extend(self._reduce_task(n, b, p, first, stages) for p in range(self.nparts[n.id]))
        return tasks

    def _map_sides(self, n: Node) -> tuple[Node, ...]:
        """The parents a keyed operator shuffles (a joined table is read in place)."""
        if n.kind == "join" and n.args.get("table"):
            return n.parents[:1]  # the table is read in place, partition p by reduce task p
        return n.parents

    def _map_stages(self, n: Node, b: int) -> tuple[tuple[str, int], ...]:
        return tuple(
            (f"sh/{n.id}/{side}/{b}", self.nparts[parent.id])
            for side, parent in enumerate(self._map_sides(n))
        )

    def _map_task(self, n: Node, side: int, b: int, m: int, first: int) -> TaskSpec:
        parent = n.parents[side]
        return TaskSpec(
            f"sh/{n.id}/{side}/{b}/{m}",
            "map",
            n.id,
            side,
            b,
            m,
            tuple(self.deps(parent, b, m, first)),
            f"map:{n.id}:{side}",
        )

    def _reduce_task(
        self, n: Node, b: int, p: int, first: int, stages: tuple[tuple[str, int], ...]
    ) -> TaskSpec:
        others: list[InputRef] = []
        prev = b - self.period[n.id]
        if n.kind == "state" and prev >= first:
            others.append((f"rd/{n.id}/{prev}/{p}", -1))
        if n.kind == "join" and n.args.get("table"):
            others.append((f"rd/{n.parents[1].id}/{b}/{p}", -1))
        return TaskSpec(
            f"rd/{n.id}/{b}/{p}",
            "result",
            n.id,
            0,
            b,
            p,
            ShuffleInputs(stages, p, tuple(others)),
            f"reduce:{n.id}",
        )

    def task_for(self, task_id: str, first: int) -> TaskSpec | None:
        """The one task of its batch named *task_id* (as :meth:`tasks_for_batch` lists it).

        Builds only that task: rebuilding a lost block re-plans the tasks on its lineage,
        not whole batches (at 1,000 workers a batch is 8,000 tasks).
        """
        parts = task_id.split("/")
        try:
            if parts[0] == "sh" and len(parts) == 5:
                nid, side, b, m = (int(x) for x in parts[1:])
            elif parts[0] in ("rd", "out") and len(parts) == 4:
                nid, b, m = (int(x) for x in parts[1:])
                side = 0
            else:
                return None
        except ValueError:
            return None
        n = self.by_id.get(nid)
        if n is None or b < 0 or not self.emits(nid, b) or m < 0:
            return None
        k = n.kind
        shuffled = nid in self.boundary and k in SHUFFLE
        if parts[0] == "sh":
            sides = self._map_sides(n) if shuffled else ()
            if side >= len(sides) or m >= self.nparts[sides[side].id]:
                return None
            return self._map_task(n, side, b, m, first)
        if m >= self.nparts[nid]:
            return None
        if parts[0] == "out":
            if k != "output":
                return None
            return next((t for t in self._output_tasks(n, b, first) if t.id == task_id), None)
        if shuffled:
            return self._reduce_task(n, b, m, first, self._map_stages(n, b))
        if k in ("transform", "window_combine") or (nid in self.boundary and k != "output"):
            if k == "source" or (k == "transform" and m != 0):
                return None
            return self._result_task(n, b, m, first)
        return None

    def _result_tasks(self, n: Node, b: int, first: int) -> list[TaskSpec]:
        parts = 1 if n.kind == "transform" else self.nparts[n.id]
        return [self._result_task(n, b, p, first) for p in range(parts)]

    def _result_task(self, n: Node, b: int, p: int, first: int) -> TaskSpec:
        if n.kind == "transform":
            inputs = tuple(self.all_deps(n.parents[0], b, first))
            return TaskSpec(
                f"rd/{n.id}/{b}/0", "result", n.id, 0, b, 0, inputs, f"transform:{n.id}"
            )
        if n.kind == "window_combine":
            inputs = self._window_combine_inputs(n, b, p, first)
        else:  # a persisted narrow node: computes its own operator over its parents
            inputs = self._own_inputs(n, b, p, first)
        return TaskSpec(f"rd/{n.id}/{b}/{p}", "result", n.id, 0, b, p, inputs, f"persist:{n.id}")

    def _own_inputs(self, n: Node, b: int, p: int, first: int) -> tuple[InputRef, ...]:
        k = n.kind
        if k in NARROW or k == "snapshot":
            return tuple(self.deps(n.parents[0], b, p, first))
        if k == "union":
            for parent in n.parents:
                c = self.nparts[parent.id]
                if p < c:
                    return tuple(self.deps(parent, b, p, first))
                p -= c
            return ()
        if k == "window":
            return tuple(self._window_deps(n, b, p, first))
        msg = f"cannot persist {n.name}"  # pragma: no cover
        raise GraphError(msg)

    def _window_deps(self, n: Node, b: int, p: int, first: int) -> list[InputRef]:
        out: list[InputRef] = []
        for x in self.window_batches(n, b - n.args["window"], b, first):
            out.extend(self.deps(n.parents[0], x, p, first))
        return out

    def _window_combine_inputs(self, n: Node, b: int, p: int, first: int) -> tuple[InputRef, ...]:
        red = n.parents[0].id
        w, s = n.args["window"], n.args["slide"]

        def reduced(lo: int, hi: int) -> list[InputRef]:
            return [(f"rd/{red}/{x}/{p}", -1) for x in self.window_batches(n, lo, hi, first)]

        if n.args.get("inv_fn") is None:
            return tuple(reduced(b - w, b))
        # incremental: previous window, plus the newest slide, minus the slide that left;
        # the executor tells the three apart by their batch numbers
        prev = [] if b - s < first else [(f"rd/{n.id}/{b - s}/{p}", -1)]
        return tuple(prev + reduced(b - s, b) + reduced(b - s - w, b - w))

    def _output_tasks(self, n: Node, b: int, first: int) -> list[TaskSpec]:
        parent = n.parents[0]
        if self.nparts[n.id] == 1 and n.args["sink"] in ("foreach", "pprint"):
            return [
                TaskSpec(
                    f"out/{n.id}/{b}/0",
                    "output",
                    n.id,
                    0,
                    b,
                    0,
                    tuple(self.all_deps(parent, b, first)),
                    f"output:{n.id}",
                )
            ]
        return [
            TaskSpec(
                f"out/{n.id}/{b}/{p}",
                "output",
                n.id,
                0,
                b,
                p,
                tuple(self.deps(parent, b, p, first)),
                f"output:{n.id}",
            )
            for p in range(self.nparts[n.id])
        ]

    def freeable(self, block_id: str, completed: int) -> bool:
        """Whether no batch after *completed* reads the block (all batches <= it are done)."""
        b = block_batch(block_id)
        if block_id.startswith("sh/"):
            return b <= completed
        return b + self.keep.get(block_node(block_id), 0) <= completed

    def stateful_nodes(self) -> list[Node]:
        """Nodes whose partitions chain across batches (checkpointed state)."""
        return [
            n
            for n in self.nodes
            if n.kind == "state"
            or (n.kind == "window_combine" and n.args.get("inv_fn") is not None)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            n.name: {
                "parts": self.nparts[n.id],
                "period": self.period[n.id],
                "boundary": n.id in self.boundary,
            }
            for n in self.nodes
        }
