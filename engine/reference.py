"""A plain-Python reference of DStream semantics: no planner, no partitions, no blocks.

It walks the same graph a batch at a time and computes every operator the obvious way, so
engine results (in-process or on the fleet) can be compared with it. User functions are
assumed deterministic, and reduce functions associative and commutative (as in Spark).

A record on which a record-wise user function (``map``, ``filter``, ``flat_map``,
``map_values``, ``flat_map_values``) raises is left out and listed in
:attr:`ReferenceRunner.dead_letters`, as the executor dead-letters it; a ``transform`` that
raises gives an empty batch and one dead letter, as there. Where the executor's letters
depend on how records were partitioned (a raising reduce function), the reference stops
with the error instead of guessing.

Public: :class:`ReferenceRunner` is the expected side of ``engine.testing.run_reference``,
of ``dstream verify`` (``ops/tools/verify.py``) and of the fleet golden tests.
"""

from __future__ import annotations

import functools
from typing import Any

from engine.graph import TIMEOUT, Node, StreamingContext


class ReferenceRunner:
    """Evaluates a graph batch by batch, keeping state and window history in dicts.

    Args:
        ssc: the built context (queue_stream sources, or ``inputs`` per source node id).
        first: index of the first batch.
        inputs: optional records per source node id, a list per batch (Kafka sources).

    """

    def __init__(
        self,
        ssc: StreamingContext,
        first: int = 0,
        inputs: dict[int, list[list[Any]]] | None = None,
    ) -> None:
        self.ssc = ssc
        self.first = first
        self.inputs = inputs or {}
        self.interval_ms = ssc.batch_interval_ms
        self.history: dict[tuple[int, int], list[Any] | None] = {}
        self.states: dict[int, dict[Any, Any]] = {}
        self.outputs: dict[int, list[tuple[int, list[Any]]]] = {
            n.id: [] for n in ssc.nodes if n.kind == "output"
        }
        self.period: dict[int, int] = {}
        for n in ssc.nodes:
            pp = [self.period[p.id] for p in n.parents]
            base = pp[0] if pp else 1
            self.period[n.id] = n.args["slide"] if n.kind in ("window", "window_reduce") else base
        self.next_batch = first
        #: ``(batch, operator name, "Type: message", record)`` per record a user function
        #: raised on, in evaluation order.
        self.dead_letters: list[tuple[int, str, str, Any]] = []

    def _each(self, n: Node, b: int, records: list[Any], fn: Any) -> list[Any]:
        """``fn(x)`` per record, each a list of results; a raising record is dead-lettered."""
        out: list[Any] = []
        for x in records:
            try:
                out += fn(x)
            except Exception as e:
                self.dead_letters.append((b, n.name, f"{type(e).__name__}: {e}", x))
        return out

    def emits(self, n: Node, b: int) -> bool:
        return (b + 1) % self.period[n.id] == 0

    def run(self, num_batches: int) -> None:
        for _ in range(num_batches):
            b = self.next_batch
            self.next_batch += 1
            for n in self.ssc.nodes:
                self.history[(n.id, b)] = self._eval(n, b) if self.emits(n, b) else None

    def get(self, n: Node, b: int) -> list[Any]:
        if b < self.first:
            return []
        v = self.history.get((n.id, b))
        return v if v is not None else []

    def _window(self, n: Node, lo: int, hi: int) -> list[list[Any]]:
        parent = n.parents[0]
        return [
            self.get(parent, x)
            for x in range(max(lo + 1, self.first), hi + 1)
            if self.emits(parent, x)
        ]

    def _eval(self, n: Node, b: int) -> list[Any]:
        k, a = n.kind, n.args
        ins = [self.get(p, b) for p in n.parents]
        fn: Any = a.get("fn")
        if k == "source":
            if a["source"] == "queue":
                i = b - self.first
                return list(a["batches"][i]) if i < len(a["batches"]) else list(a["default"])
            batches = self.inputs.get(n.id, [])
            i = b - self.first
            return list(batches[i]) if i < len(batches) else []
        if k == "map":
            return self._each(n, b, ins[0], lambda x: [fn(x)])
        if k == "flat_map":
            return self._each(n, b, ins[0], lambda x: list(fn(x)))
        if k == "filter":
            return self._each(n, b, ins[0], lambda x: [x] if fn(x) else [])
        if k == "map_values":
            return self._each(n, b, ins[0], lambda kv: [(kv[0], fn(kv[1]))])
        if k == "flat_map_values":
            return self._each(n, b, ins[0], lambda kv: [(kv[0], y) for y in fn(kv[1])])
        if k == "union":
            return [x for i in ins for x in i]
        if k == "repartition":
            return list(ins[0])
        if k == "count":
            return [len(ins[0])]
        if k == "reduce":
            return [functools.reduce(fn, ins[0])] if ins[0] else []
        if k == "reduce_by_key":
            return list(_fold(ins[0], fn).items())
        if k == "group_by_key":
            return list(_group(ins[0]).items())
        if k in ("cogroup", "join"):
            groups = [_group(i) for i in ins]
            keys = list(dict.fromkeys(kk for g in groups for kk in g))
            if k == "cogroup":
                return [(kk, tuple(g.get(kk, []) for g in groups)) for kk in keys]
            how = a["how"]
            if a.get("table"):  # the table as of the end of this batch (evaluated before)
                table = self.states.get(n.parents[1].id, {})
                groups[1] = {kk: [table[kk]] for kk in groups[0] if kk in table}
            out: list[Any] = []
            for kk in keys:
                left, right = groups[0].get(kk, []), groups[1].get(kk, [])
                if left and right:
                    out += [(kk, (v, w)) for v in left for w in right]
                elif left and how in ("left_outer_join", "full_outer_join"):
                    out += [(kk, (v, None)) for v in left]
                elif right and how in ("right_outer_join", "full_outer_join"):
                    out += [(kk, (None, w)) for w in right]
            return out
        if k == "transform":
            try:
                return list(fn(b * self.interval_ms, ins[0]) if a["with_time"] else fn(ins[0]))
            except Exception as e:
                where = f"<batch of {len(ins[0])} records>"
                self.dead_letters.append((b, n.name, f"{type(e).__name__}: {e}", where))
                return []
        if k == "window":
            return [x for batch in self._window(n, b - a["window"], b) for x in batch]
        if k == "window_reduce":
            return self._window_reduce(n, b)
        if k == "state" and a["mode"] == "table":
            return self._table(n, b, ins[0] if ins else [])
        if k == "state":
            return self._state(n, b, ins[0])
        if k == "snapshot":
            st = self.states.get(n.parents[0].id, {})
            if n.parents[0].args["mode"] == "track":
                return [(kk, v[0]) for kk, v in st.items()]
            return list(st.items())
        if k == "output":
            self.outputs[n.id].append((b, list(ins[0])))
            return []
        msg = f"reference: unknown operator {k}"  # pragma: no cover
        raise AssertionError(msg)

    def _window_reduce(self, n: Node, b: int) -> list[Any]:
        a = n.args
        fn, inv, w, s = a["fn"], a["inv_fn"], a["window"], a["slide"]
        if inv is None:
            acc = _fold([x for batch in self._window(n, b - w, b) for x in batch], fn)
        else:
            acc = dict(self.states.get(n.id, {})) if b - s >= self.first else {}
            prev_keys = set(acc)
            # Spark: subtract the slide that left from the previous window's keys only,
            # then add the newest slide
            for batch in self._window(n, b - s - w, b - w):
                for kk, v in batch:
                    if kk in prev_keys:
                        acc[kk] = inv(acc[kk], v)
            for batch in self._window(n, b - s, b):
                for kk, v in batch:
                    acc[kk] = fn(acc[kk], v) if kk in acc else v
        items = list(acc.items())
        if a.get("filter_fn") is not None:
            items = [kv for kv in items if a["filter_fn"](kv)]
        self.states[n.id] = dict(items)
        return items

    def _table(self, n: Node, b: int, records: list[Any]) -> list[Any]:
        """A table: the file's content at the first batch, then last write wins, None deletes.

        The changelog has, per key updated in the batch, its final value (None when a key
        that existed before the batch was deleted).
        """
        if b == self.first:
            self.states[n.id] = dict(n.args["base"])
        st = self.states[n.id]
        existed = {kk: kk in st for kk, _ in records}
        for kk, v in records:
            if v is None:
                st.pop(kk, None)
            else:
                st[kk] = v
        changes: list[Any] = []
        for kk in dict.fromkeys(kk for kk, _ in records):
            if kk in st:
                changes.append((kk, st[kk]))
            elif existed[kk]:
                changes.append((kk, None))
        return changes

    def _state(self, n: Node, b: int, records: list[Any]) -> list[Any]:
        a = n.args
        st = self.states.setdefault(n.id, {})
        fn = a["fn"]
        changes: list[Any] = []
        if a["mode"] == "running_reduce":
            for kk, v in _fold(records, fn).items():
                st[kk] = fn(st[kk], v) if kk in st else v
                changes.append((kk, st[kk]))
        elif a["mode"] == "update_state":
            groups = _group(records)
            for kk in list(st) + [x for x in groups if x not in st]:
                old = st.get(kk)
                new = fn(groups.get(kk, []), old)
                if new is None:
                    if kk in st:
                        del st[kk]
                        changes.append((kk, None))
                    continue
                st[kk] = new
                if kk in groups or new != old:
                    changes.append((kk, new))
        else:
            init, timeout = a["init"], a["timeout"]
            groups = _group(records)
            for kk, evs in groups.items():
                entry = st.get(kk)
                cur = entry[0] if entry is not None else None
                for ev in evs:
                    cur = init(kk, ev) if cur is None else fn(kk, cur, ev)
                if cur is None:
                    if entry is not None:
                        del st[kk]
                        changes.append((kk, None))
                    continue
                st[kk] = (cur, b)
                changes.append((kk, cur))
            if timeout:
                for kk, (cur, seen) in list(st.items()):
                    if kk not in groups and b - seen >= timeout:
                        changes.append((kk, fn(kk, cur, TIMEOUT)))
                        del st[kk]
        return changes


def _fold(records: list[Any], fn: Any) -> dict[Any, Any]:
    acc: dict[Any, Any] = {}
    for kk, v in records:
        acc[kk] = fn(acc[kk], v) if kk in acc else v
    return acc


def _group(records: list[Any]) -> dict[Any, list[Any]]:
    g: dict[Any, list[Any]] = {}
    for kk, v in records:
        g.setdefault(kk, []).append(v)
    return g
