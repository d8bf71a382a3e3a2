"""Task execution: a task is a pure function of its input blocks.

:meth:`Executor.run` reads the task's input blocks through a ``fetch`` callable (the local
block store, a peer, a checkpoint), runs the fused narrow operators, and returns the block it
produces (or, for output tasks, the records to commit) plus dead letters. It does no other
I/O, so re-running a task, here or on another worker, gives byte-identical output.

Public: the worker and :class:`engine.local.LocalRunner` run tasks with :class:`Executor`;
block stores (``state.blockstore``) size blocks with :func:`block_size`, hold
:class:`StateBlock` partitions and raise :class:`BlockMissing`; sinks receive
:class:`DeadLetter` s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import orjson

from engine.codec import CodecError, normalize, pack, stable_hash, unpack
from engine.errors import DStreamError, UserFunctionError
from engine.graph import TIMEOUT, Node
from engine.plan import NARROW, Plan, TaskSpec, block_batch, block_node
from engine.tables import apply_updates, base_partition

Fetch = Callable[[str, int], Any]


class BlockMissing(DStreamError):
    """An input block is no longer held where the task looked for it."""

    def __init__(self, block_id: str, gone_from: list[str] | None = None) -> None:
        self.block_id = block_id
        self.gone_from = gone_from or []
        super().__init__(f"block {block_id} is not available")


@dataclass
class StateBlock:
    """A state partition at one batch: the state and the changelog of that batch.

    Immutable once produced: the next batch copies ``state`` before changing it, so a
    checkpoint can serialize it in the background.
    """

    state: dict[Any, Any]
    changes: list[Any]
    nbytes: int = 0

    def to_bytes(self) -> bytes:
        return pack([list(self.state.items()), self.changes])

    @classmethod
    def from_bytes(cls, data: bytes) -> StateBlock:
        items, changes = unpack(data)
        return cls(dict(items), list(changes), len(data))


@dataclass(frozen=True)
class DeadLetter:
    """A record that could not be decoded or on which a user function raised."""

    topic: str
    partition: int
    offset: int
    operator: str
    error: str
    value: bytes
    #: the value's size before it was cut to a bounded prefix (0: not truncated)
    original_size: int = 0


@dataclass
class TaskResult:
    """What a task produced: a block (map/result) or records to commit (output)."""

    spec: TaskSpec
    block: Any = None
    records: list[Any] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    input_records: int = 0

    @property
    def nbytes(self) -> int:
        return block_size(self.block)


def block_size(block: Any) -> int:
    if block is None:
        return 0
    if isinstance(block, bytes | bytearray):
        return len(block)
    if isinstance(block, StateBlock):
        return block.nbytes
    if isinstance(block, list):
        return sum(len(x) for x in block)
    return 0


class _Ctx:
    """Per-task context: dead letters and the coordinates of the current source record."""

    __slots__ = ("batch", "coords", "dead", "fail", "first", "input_records", "interval_ms")

    def __init__(self, batch: int, first: int, interval_ms: int, fail: bool) -> None:
        self.batch = batch
        self.first = first
        self.interval_ms = interval_ms
        self.fail = fail
        self.coords: tuple[str, int, int] = ("", -1, -1)
        self.dead: list[DeadLetter] = []
        self.input_records = 0

    def dead_letter(self, operator: str, error: BaseException, record: Any) -> None:
        topic, partition, offset = self.coords
        if self.fail:
            raise UserFunctionError(
                operator, error, record, f"topic={topic} partition={partition} offset={offset}"
            )
        if isinstance(record, bytes):
            raw = record
        else:
            try:
                raw = json.dumps(record, default=repr).encode()
            except (TypeError, ValueError):
                raw = repr(record).encode()
        self.dead.append(
            DeadLetter(topic, partition, offset, operator, f"{type(error).__name__}: {error}", raw)
        )


# -- narrow operators ----------------------------------------------------------------------
def _apply(n: Node, it: Iterable[Any], ctx: _Ctx) -> Iterator[Any]:
    fn = n.args.get("fn")
    k = n.kind
    name = n.name
    if k == "map":
        for x in it:
            try:
                y = fn(x)  # type: ignore[misc]
            except Exception as e:
                ctx.dead_letter(name, e, x)
                continue
            yield y
    elif k == "filter":
        for x in it:
            try:
                keep = fn(x)  # type: ignore[misc]
            except Exception as e:
                ctx.dead_letter(name, e, x)
                continue
            if keep:
                yield x
    elif k == "flat_map":
        for x in it:
            try:
                ys = list(fn(x))  # type: ignore[misc]
            except Exception as e:
                ctx.dead_letter(name, e, x)
                continue
            yield from ys
    elif k == "map_values":
        for x in it:
            try:
                key, v = x
                y = (key, fn(v))  # type: ignore[misc]
            except Exception as e:
                ctx.dead_letter(name, e, x)
                continue
            yield y
    elif k == "flat_map_values":
        for x in it:
            try:
                key, v = x
                ys = [(key, y) for y in fn(v)]  # type: ignore[misc]
            except Exception as e:
                ctx.dead_letter(name, e, x)
                continue
            yield from ys
    else:  # pragma: no cover
        msg = f"not a narrow operator: {name}"
        raise DStreamError(msg)


def _decode_source(n: Node, raw: Any, ctx: _Ctx) -> Iterator[Any]:
    """Records of a sealed input block, decoded once, with dead letters for bad ones."""
    topic, partition, _from, _until, values, offsets, keys, stamps = unpack(raw)
    fmt = n.args.get("value_format", "object") if n.args["source"] == "kafka" else "object"
    meta = n.args.get("with_metadata", False)
    if n.args.get("table"):
        yield from _decode_table(n, keys, values, offsets, topic, partition, ctx)
        return
    ctx.input_records += len(values)
    name = f"{n.name}.decode"
    loads: Callable[[Any], Any]
    if fmt == "json":
        loads = orjson.loads
    elif fmt == "msgpack":
        loads = _msgpack_value
    else:
        loads = _identity
    for i, v in enumerate(values):
        off = offsets[i] if offsets else i
        ctx.coords = (topic, partition, off)
        try:
            value = loads(v)
        except (
            ValueError,
            TypeError,
            msgpack.UnpackException,
            CodecError,
            orjson.JSONDecodeError,
        ) as e:
            ctx.dead_letter(name, e, v)
            continue
        if meta:
            yield {
                "key": keys[i] if keys else None,
                "value": value,
                "topic": topic,
                "partition": partition,
                "offset": off,
                "timestamp": stamps[i] if stamps else None,
            }
        else:
            yield value
    ctx.coords = ("", -1, -1)


def _decode_table(
    n: Node,
    keys: list[Any] | None,
    values: list[Any],
    offsets: list[int] | None,
    topic: str,
    partition: int,
    ctx: _Ctx,
) -> Iterator[Any]:
    """``(key, value)`` updates of a table topic: key as UTF-8 text, a null value deletes.

    A record without a key, or whose key or value does not decode, is dead-lettered.
    """
    fmt = n.args.get("value_format", "json")
    loads: Callable[[Any], Any] = (
        orjson.loads if fmt == "json" else _msgpack_value if fmt == "msgpack" else _identity
    )
    ctx.input_records += len(values)
    name = f"{n.name}.decode"
    for i, v in enumerate(values):
        ctx.coords = (topic, partition, offsets[i] if offsets else i)
        try:
            raw_key = keys[i] if keys else None
            if raw_key is None:
                msg = "a table record needs a key"
                raise ValueError(msg)
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            value = None if v is None else loads(v)
        except (
            ValueError,
            TypeError,
            msgpack.UnpackException,
            CodecError,
            orjson.JSONDecodeError,
        ) as e:
            ctx.dead_letter(name, e, b"" if v is None else v)
            continue
        yield key, value
    ctx.coords = ("", -1, -1)


def _msgpack_value(v: bytes) -> Any:
    return unpack(v, max_bytes=len(v))


def _identity(v: Any) -> Any:
    return v


class Executor:
    """Runs tasks of one plan. Stateless between tasks; safe to share across threads.

    Args:
        plan: the compiled graph.
        first: the app's first batch (blocks of earlier batches are empty).
        interval_ms: the batch interval, for batch times passed to user functions.
        fail_on_error: raise :class:`UserFunctionError` instead of dead-lettering.

    """

    def __init__(self, plan: Plan, first: int, interval_ms: int, fail_on_error: bool = False):
        self.plan = plan
        self.first = first
        self.interval_ms = interval_ms
        self.fail_on_error = fail_on_error

    # -- reading -----------------------------------------------------------------------------
    def read(self, n: Node, b: int, p: int, fetch: Fetch, ctx: _Ctx) -> Iterator[Any]:
        """Records of partition *p* of *n* at batch *b*, mirroring :meth:`Plan.deps`."""
        plan = self.plan
        if n.kind == "snapshot" and n.id not in plan.boundary:
            if b < self.first or not plan.emits(n.id, b):
                return iter(())
            blk: StateBlock = fetch(f"rd/{n.parents[0].id}/{b}/{p}", -1)
            return iter(_snapshot_items(n.parents[0], blk))
        if n.id in plan.boundary:
            if b < self.first or not plan.emits(n.id, b):
                return iter(())
            if n.kind == "source":
                return _decode_source(n, fetch(f"in/{n.id}/{b}/{p}", -1), ctx)
            data = fetch(f"rd/{n.id}/{b}/{p}", -1)
            if isinstance(data, StateBlock):
                return iter(data.changes)
            return iter(unpack(data))
        return self._compute(n, b, p, fetch, ctx)

    def _compute(self, n: Node, b: int, p: int, fetch: Fetch, ctx: _Ctx) -> Iterator[Any]:
        """Partition *p* of *n* computed from its parents (not from its own block)."""
        k = n.kind
        plan = self.plan
        if k in NARROW:
            return _apply(n, self.read(n.parents[0], b, p, fetch, ctx), ctx)
        if k == "snapshot":
            blk: StateBlock = fetch(f"rd/{n.parents[0].id}/{b}/{p}", -1)
            return iter(_snapshot_items(n.parents[0], blk))
        if k == "union":
            for parent in n.parents:
                c = plan.nparts[parent.id]
                if p < c:
                    return self.read(parent, b, p, fetch, ctx)
                p -= c
            return iter(())
        if k == "window":
            batches = plan.window_batches(n, b - n.args["window"], b, self.first)
            return _chain(self.read(n.parents[0], x, p, fetch, ctx) for x in batches)
        msg = f"cannot compute {n.name} from its parents"  # pragma: no cover
        raise DStreamError(msg)

    def read_all(self, n: Node, b: int, fetch: Fetch, ctx: _Ctx) -> list[Any]:
        out: list[Any] = []
        for p in range(self.plan.nparts[n.id]):
            out.extend(self.read(n, b, p, fetch, ctx))
        return out

    # -- tasks -------------------------------------------------------------------------------
    def run(self, spec: TaskSpec, fetch: Fetch) -> TaskResult:
        """Run one task; raises :class:`BlockMissing` when an input block is gone."""
        ctx = _Ctx(spec.batch, self.first, self.interval_ms, self.fail_on_error)
        n = self.plan.by_id[spec.node]
        res = TaskResult(spec)
        if spec.kind == "map":
            res.block = self._map_side(n, spec, fetch, ctx)
        elif spec.kind == "result":
            res.block = self._result(n, spec, fetch, ctx)
        else:
            parent = n.parents[0]
            if n.args["sink"] in ("foreach", "pprint"):
                res.records = self.read_all(parent, spec.batch, fetch, ctx)
            else:
                res.records = list(self.read(parent, spec.batch, spec.part, fetch, ctx))
        res.dead_letters = ctx.dead
        res.input_records = ctx.input_records
        return res

    def _map_side(self, n: Node, spec: TaskSpec, fetch: Fetch, ctx: _Ctx) -> list[bytes]:
        records = self.read(n.parents[spec.side], spec.batch, spec.part, fetch, ctx)
        k = n.kind
        nparts = self.plan.nparts[n.id]
        if k == "count":
            return [pack([sum(1 for _ in records)])]
        if k == "reduce":
            return [pack(_fold(records, n.args["fn"], ctx, n.name))]
        if k == "repartition":
            rr: list[list[Any]] = [[] for _ in range(nparts)]
            for i, x in enumerate(records):
                rr[(i + spec.part) % nparts].append(x)
            return [pack(bucket) for bucket in rr]
        combine = (
            n.args["fn"]
            if k == "reduce_by_key" or (k == "state" and n.args["mode"] == "running_reduce")
            else None
        )
        if combine is not None:
            # map-side combine first, then hash each distinct key once (not each record)
            combined: dict[Any, Any] = {}
            for x in records:
                try:
                    key, v = x
                    combined[key] = combine(combined[key], v) if key in combined else v
                except Exception as e:
                    ctx.dead_letter(n.name, e, x)
            items: list[list[Any]] = [[] for _ in range(nparts)]
            for key, v in combined.items():
                try:
                    items[stable_hash(key) % nparts].append((key, v))
                except Exception as e:
                    ctx.dead_letter(n.name, e, (key, v))
            return [pack(bucket) for bucket in items]
        lists: list[list[Any]] = [[] for _ in range(nparts)]
        hashes: dict[Any, int] = {}
        for x in records:
            try:
                key, v = x
                h = hashes.get(key)
                if h is None:
                    h = hashes[key] = stable_hash(key) % nparts
                lists[h].append((key, v))
            except Exception as e:
                ctx.dead_letter(n.name, e, x)
        return [pack(bucket) for bucket in lists]

    def _result(self, n: Node, spec: TaskSpec, fetch: Fetch, ctx: _Ctx) -> Any:
        k = n.kind
        b, p = spec.batch, spec.part
        if k == "transform":
            records = self.read_all(n.parents[0], b, fetch, ctx)
            fn = n.args["fn"]
            try:
                out = fn(b * self.interval_ms, records) if n.args["with_time"] else fn(records)
                return pack(list(out))
            except CodecError:
                raise
            except Exception as e:
                ctx.dead_letter(n.name, e, f"<batch of {len(records)} records>")
                return pack([])
        if k == "window_combine":
            return pack(self._window_combine(n, spec, fetch, ctx))
        if k == "state":
            return self._state(n, spec, fetch, ctx)
        if k in (
            "reduce_by_key",
            "group_by_key",
            "cogroup",
            "join",
            "repartition",
            "count",
            "reduce",
        ):
            return pack(self._reduce_side(n, spec, fetch, ctx))
        # a persisted narrow node, union, window or snapshot
        return pack(list(self._compute(n, b, p, fetch, ctx)))

    def _buckets(self, spec: TaskSpec, fetch: Fetch) -> Iterator[tuple[int, Any]]:
        """(side, records) of each map-output bucket the reduce task reads, in order."""
        for bid, bucket in spec.inputs:
            if bid.startswith("sh/"):
                yield int(bid.split("/")[2]), unpack(fetch(bid, bucket))

    def _reduce_side(self, n: Node, spec: TaskSpec, fetch: Fetch, ctx: _Ctx) -> list[Any]:
        k = n.kind
        if k == "count":
            return [sum(r[0] for _, r in self._buckets(spec, fetch))]
        if k == "reduce":
            partials = (x for _, r in self._buckets(spec, fetch) for x in r)
            return _fold(partials, n.args["fn"], ctx, n.name)
        if k == "repartition":
            return [x for _, r in self._buckets(spec, fetch) for x in r]
        if k == "reduce_by_key":
            fn = n.args["fn"]
            d: dict[Any, Any] = {}
            for _, r in self._buckets(spec, fetch):
                for key, v in r:
                    if key in d:
                        try:
                            d[key] = fn(d[key], v)
                        except Exception as e:
                            ctx.dead_letter(n.name, e, (key, v))
                    else:
                        d[key] = v
            return list(d.items())
        if k == "group_by_key":
            g: dict[Any, list[Any]] = {}
            for _, r in self._buckets(spec, fetch):
                for key, v in r:
                    g.setdefault(key, []).append(v)
            return list(g.items())
        # cogroup / join
        sides = len(n.parents)
        cg: dict[Any, tuple[list[Any], ...]] = {}
        for side, r in self._buckets(spec, fetch):
            for key, v in r:
                if key not in cg:
                    cg[key] = tuple([] for _ in range(sides))
                cg[key][side].append(v)
        if n.args.get("table"):  # the table's partition of this batch, read in place
            table = _state_of(fetch(f"rd/{n.parents[1].id}/{spec.batch}/{spec.part}", -1))
            for key, (_left, right) in cg.items():
                if key in table:
                    right.append(table[key])
        if k == "cogroup":
            return list(cg.items())
        return _join(n.args["how"], cg)

    def _window_combine(self, n: Node, spec: TaskSpec, fetch: Fetch, ctx: _Ctx) -> list[Any]:
        fn: Any = n.args["fn"]
        inv: Any = n.args.get("inv_fn")
        b, s, w = spec.batch, n.args["slide"], n.args["window"]
        acc: dict[Any, Any] = {}
        olds: list[Any] = []

        def fold(key: Any, v: Any, f: Callable[[Any, Any], Any]) -> None:
            try:
                acc[key] = f(acc[key], v) if key in acc else v
            except Exception as e:
                ctx.dead_letter(n.name, e, (key, v))

        news: list[Any] = []
        for bid, _ in spec.inputs:
            records = unpack(fetch(bid, -1))
            if block_node(bid) == n.id:  # the previous window
                acc.update(records)
            elif inv is None or block_batch(bid) > b - s:
                news.append(records)
            else:
                olds.append(records)
        # as Spark's ReducedWindowedDStream: the slide that left is subtracted only from
        # keys of the previous window (a key filter_fn dropped has nothing to subtract
        # from), then the newest slide is added
        prev_keys = set(acc)
        for records in olds:
            for key, v in records:
                if key in prev_keys:
                    fold(key, v, inv)
        for records in news:
            for key, v in records:
                fold(key, v, fn)
        filt = n.args.get("filter_fn")
        items = list(acc.items())
        if filt is not None:  # a user function too: a raising call drops the key
            kept: list[Any] = []
            for kv in items:
                try:
                    if filt(kv):
                        kept.append(kv)
                except Exception as e:
                    ctx.dead_letter(n.name, e, kv)
            items = kept
        _ = w
        return items

    def _state(self, n: Node, spec: TaskSpec, fetch: Fetch, ctx: _Ctx) -> StateBlock:
        prev: dict[Any, Any] = {}
        for bid, bucket in spec.inputs:
            if bid.startswith("rd/"):
                prev = _state_of(fetch(bid, bucket))
        mode = n.args["mode"]
        fn = n.args["fn"]
        state = prev if mode == "table" else dict(prev)
        changes: list[Any] = []
        if mode == "table":
            updates = [kv for _, r in self._buckets(spec, fetch) for kv in r]
            if spec.batch == self.first:
                state = base_partition(n.args["base"], spec.part, self.plan.nparts[n.id])
            elif updates:
                state = dict(prev)
            # else: unchanged, the block shares the previous partition's dict (never mutated)
            changes = apply_updates(state, updates)
        elif mode == "running_reduce":
            batch: dict[Any, Any] = {}
            for _, r in self._buckets(spec, fetch):
                for key, v in r:
                    try:
                        batch[key] = fn(batch[key], v) if key in batch else v
                    except Exception as e:
                        ctx.dead_letter(n.name, e, (key, v))
            for key, v in batch.items():
                try:
                    new = normalize(fn(state[key], v)) if key in state else v
                except Exception as e:
                    ctx.dead_letter(n.name, e, (key, v))
                    continue
                state[key] = new
                changes.append((key, new))
        elif mode == "update_state":
            groups: dict[Any, list[Any]] = {}
            for _, r in self._buckets(spec, fetch):
                for key, v in r:
                    groups.setdefault(key, []).append(v)
            for key in list(prev) + [x for x in groups if x not in prev]:
                old = prev.get(key)
                try:
                    new = fn(groups.get(key, []), old)
                except Exception as e:
                    ctx.dead_letter(n.name, e, (key, groups.get(key, [])))
                    continue
                if new is None:
                    if key in state:
                        del state[key]
                        changes.append((key, None))
                    continue
                new = normalize(new)
                state[key] = new
                if key in groups or new != old:
                    changes.append((key, new))
        else:
            changes = self._track(n, spec, fetch, ctx, state)
        blk = StateBlock(state, changes)
        blk.nbytes = 64 * len(state) + 1
        return blk

    def _track(
        self, n: Node, spec: TaskSpec, fetch: Fetch, ctx: _Ctx, state: dict[Any, Any]
    ) -> list[Any]:
        init, update, timeout = n.args["init"], n.args["fn"], n.args["timeout"]
        b = spec.batch
        events: dict[Any, list[Any]] = {}
        for _, r in self._buckets(spec, fetch):
            for key, ev in r:
                events.setdefault(key, []).append(ev)
        changes: list[Any] = []
        for key, evs in events.items():
            entry = state.get(key)
            st = entry[0] if entry is not None else None
            existed = entry is not None
            for ev in evs:
                try:
                    st = init(key, ev) if st is None else update(key, st, ev)
                except Exception as e:
                    ctx.dead_letter(n.name, e, (key, ev))
            if st is None:
                if existed:
                    del state[key]
                    changes.append((key, None))
                continue
            st = normalize(st)
            state[key] = (st, b)
            changes.append((key, st))
        if timeout:
            for key, (st, seen) in list(state.items()):
                if key not in events and b - seen >= timeout:
                    try:
                        final = normalize(update(key, st, TIMEOUT))
                    except Exception as e:
                        ctx.dead_letter(n.name, e, (key, "<timeout>"))
                        final = None
                    del state[key]
                    changes.append((key, final))
        return changes


def _fold(records: Iterable[Any], fn: Any, ctx: _Ctx, name: str) -> list[Any]:
    """All records combined with *fn* in order: ``[]`` for none, else ``[result]``.

    A record on which *fn* raises is dead-lettered and left out of the result.
    """
    acc: list[Any] = []
    for x in records:
        if acc:
            try:
                acc[0] = fn(acc[0], x)
            except Exception as e:
                ctx.dead_letter(name, e, x)
        else:
            acc.append(x)
    return acc


def _state_of(got: Any) -> dict[Any, Any]:
    """The state dict of a state partition, held (a StateBlock) or fetched as bytes."""
    return got.state if isinstance(got, StateBlock) else StateBlock.from_bytes(got).state


def _snapshot_items(state_node: Node, blk: StateBlock) -> list[Any]:
    if state_node.args.get("mode") == "track":
        return [(k, v[0]) for k, v in blk.state.items()]
    return list(blk.state.items())


def _chain(its: Iterable[Iterator[Any]]) -> Iterator[Any]:
    for it in its:
        yield from it


def _join(how: str, cg: dict[Any, tuple[list[Any], ...]]) -> list[Any]:
    out: list[Any] = []
    for key, (left, right) in cg.items():
        if left and right:
            out.extend((key, (v, w)) for v in left for w in right)
        elif left and how in ("left_outer_join", "full_outer_join"):
            out.extend((key, (v, None)) for v in left)
        elif right and how in ("right_outer_join", "full_outer_join"):
            out.extend((key, (None, w)) for w in right)
    return out
