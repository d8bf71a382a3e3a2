"""The DStream graph: nodes created by the public API, validated when they are built.

Every process imports the app file and calls ``build(ssc)``, so every process builds the
same graph with the same node ids (ids are assigned in creation order). Tasks name
operators by id; closures never travel over the network.

Public: users reach :class:`StreamingContext`, :class:`DStream` and ``TIMEOUT`` through
``engine``; :class:`Node` (one vertex of the graph) is what the plan, the executor, the sinks
and ``dstream verify`` read.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.durations import Duration, to_seconds
from engine.errors import GraphError

#: Passed as the event to ``track``'s update function when a key timed out.
TIMEOUT = object()

_VALUE_FORMATS = ("json", "msgpack", "raw")

#: A stream name given with ``DStream.name``: safe in a URL path, a CLI argument and a
#: metric label; never the ``kind#id`` form of a default name.
_STREAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,99}")


def is_stream_name(name: str) -> bool:
    """Whether *name* is one a user gave with ``DStream.name`` (not a default label)."""
    return bool(_STREAM_NAME.fullmatch(name))


def _check_callable(op: str, name: str, fn: Any) -> None:
    if not callable(fn):
        msg = f"{op}: {name} must be callable, got {type(fn).__name__} {fn!r}"
        raise GraphError(msg)


def _as_batches(seconds: float, interval: float, what: str, op: str) -> int:
    """Convert a duration to a whole number of batch intervals, or raise GraphError."""
    if seconds <= 0:
        msg = f"{op}: {what} must be positive, got {seconds}s"
        raise GraphError(msg)
    n = round(seconds / interval)
    if n < 1 or abs(n * interval - seconds) > 1e-6 * max(1.0, seconds):
        msg = (
            f"{op}: batch interval must divide the {what}: {what}={seconds:g}s, "
            f"batch={interval:g}s; use a multiple of {interval:g}s"
        )
        raise GraphError(msg)
    return n


@dataclass(eq=False)
class Node:
    """One operator of the graph. ``kind`` selects its semantics; ``args`` holds its functions.

    Attributes:
        id: creation order, identical in every process that builds the same app.
        kind: operator name (``map``, ``reduce_by_key``, ``window`` ...).
        parents: input nodes.
        args: operator arguments (functions, window lengths in batches ...).
        name: label used in metrics, errors and dead-letter headers.

    """

    id: int
    kind: str
    parents: tuple[Node, ...]
    args: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __repr__(self) -> str:
        return f"<{self.kind}#{self.id}>"


class DStream:
    """A discretized stream: one immutable, partitioned dataset per batch interval.

    Methods build new streams; nothing runs until the context is started. Semantics follow
    Spark Streaming unless a docstring says otherwise.
    """

    def __init__(self, ssc: StreamingContext, node: Node) -> None:
        self._ssc = ssc
        self._node = node

    @property
    def node(self) -> Node:
        return self._node

    def name(self, name: str) -> DStream:
        """Name this stream; returns it (``counts = pairs.running_reduce(add).name("counts")``).

        The name labels the stream in metrics, errors and dead letters, and a stateful
        stream's state (``running_reduce``, ``update_state_by_key``, ``track``,
        ``reduce_by_key_and_window``, ``window``) can be read by it while the app runs:
        ``dstream query`` and ``GET /api/state/{name}``. A named window keeps its last
        window's blocks until the next window completes, so that it can be read.

        Raises:
            GraphError: the name is not 1-100 letters, digits, ``_`` or ``-`` (starting
                with a letter or ``_``), or another stream of the app has it.

        """
        if not isinstance(name, str) or not _STREAM_NAME.fullmatch(name):
            msg = (
                f"name: a stream name is 1-100 letters, digits, '_' or '-', starting with a "
                f"letter or '_'; got {name!r}"
            )
            raise GraphError(msg)
        for n in self._ssc.nodes:
            if n.name == name and n is not self._node:
                msg = f"name: another stream is already named {name!r} ({n.kind}#{n.id})"
                raise GraphError(msg)
        self._node.name = name
        return self

    def _new(self, kind: str, parents: Sequence[DStream], **args: Any) -> DStream:
        for p in parents:
            if p._ssc is not self._ssc:
                msg = f"{kind}: streams belong to different StreamingContexts"
                raise GraphError(msg)
        return self._ssc._add(kind, tuple(p._node for p in parents), args)

    # -- stateless ---------------------------------------------------------------------
    def map(self, fn: Callable[[Any], Any]) -> DStream:
        _check_callable("map", "fn", fn)
        return self._new("map", [self], fn=fn)

    def flat_map(self, fn: Callable[[Any], Iterable[Any]]) -> DStream:
        _check_callable("flat_map", "fn", fn)
        return self._new("flat_map", [self], fn=fn)

    def filter(self, fn: Callable[[Any], bool]) -> DStream:
        _check_callable("filter", "fn", fn)
        return self._new("filter", [self], fn=fn)

    def map_values(self, fn: Callable[[Any], Any]) -> DStream:
        _check_callable("map_values", "fn", fn)
        return self._new("map_values", [self], fn=fn)

    def flat_map_values(self, fn: Callable[[Any], Iterable[Any]]) -> DStream:
        _check_callable("flat_map_values", "fn", fn)
        return self._new("flat_map_values", [self], fn=fn)

    def union(self, *others: DStream) -> DStream:
        if not others:
            msg = "union: give at least one other stream"
            raise GraphError(msg)
        return self._new("union", [self, *others])

    def repartition(self, num_partitions: int) -> DStream:
        self._ssc._check_partitions("repartition", num_partitions)
        return self._new("repartition", [self], num_partitions=num_partitions)

    def count(self) -> DStream:
        """One record per batch: the number of records in the batch (0 for an empty batch)."""
        return self._new("count", [self])

    def count_by_value(self, num_partitions: int | None = None) -> DStream:
        return self.map(lambda x: (x, 1)).reduce_by_key(operator.add, num_partitions)

    def reduce(self, fn: Callable[[Any, Any], Any]) -> DStream:
        """One record per non-empty batch: all records combined with the associative *fn*."""
        _check_callable("reduce", "fn", fn)
        return self._new("reduce", [self], fn=fn)

    def reduce_by_key(
        self, fn: Callable[[Any, Any], Any], num_partitions: int | None = None
    ) -> DStream:
        _check_callable("reduce_by_key", "fn", fn)
        n = self._ssc._partitions("reduce_by_key", num_partitions)
        return self._new("reduce_by_key", [self], fn=fn, num_partitions=n)

    def group_by_key(self, num_partitions: int | None = None) -> DStream:
        n = self._ssc._partitions("group_by_key", num_partitions)
        return self._new("group_by_key", [self], num_partitions=n)

    def cogroup(self, *others: DStream, num_partitions: int | None = None) -> DStream:
        """``(k, (values_of_self, values_of_other, ...))`` for every key in any input."""
        if not others:
            msg = "cogroup: give at least one other stream"
            raise GraphError(msg)
        n = self._ssc._partitions("cogroup", num_partitions)
        return self._new("cogroup", [self, *others], num_partitions=n)

    def _join(self, other: DStream, how: str, num_partitions: int | None) -> DStream:
        if _is_table(self._node) or _is_table(other._node):
            return self._table_join(other, how, num_partitions)
        n = self._ssc._partitions(how, num_partitions)
        return self._new("join", [self, other], how=how, num_partitions=n)

    def _table_join(self, table: DStream, how: str, num_partitions: int | None) -> DStream:
        """A stream joined with a table (``ssc.table``): reads the table's partitions in place.

        The join of batch t sees the table as of the end of batch t (its updates of batch t
        included); the join has the table's partition count, so the table is not shuffled.
        """
        if _is_table(self._node) or how not in ("join", "left_outer_join"):
            msg = (
                f"{how}: a table joins only as the right side of join or left_outer_join "
                "(stream.join(table)); use table.snapshot() for other joins"
            )
            raise GraphError(msg)
        n = table._node.args["num_partitions"]
        if num_partitions is not None and num_partitions != n:
            msg = (
                f"{how}: a join with a table has the table's {n} partitions, got "
                f"num_partitions={num_partitions}; give the table num_partitions={num_partitions}"
            )
            raise GraphError(msg)
        return self._new("join", [self, table], how=how, num_partitions=n, table=True)

    def join(self, other: DStream, num_partitions: int | None = None) -> DStream:
        return self._join(other, "join", num_partitions)

    def left_outer_join(self, other: DStream, num_partitions: int | None = None) -> DStream:
        return self._join(other, "left_outer_join", num_partitions)

    def right_outer_join(self, other: DStream, num_partitions: int | None = None) -> DStream:
        return self._join(other, "right_outer_join", num_partitions)

    def full_outer_join(self, other: DStream, num_partitions: int | None = None) -> DStream:
        return self._join(other, "full_outer_join", num_partitions)

    def transform(self, fn: Callable[..., Iterable[Any]]) -> DStream:
        """Apply *fn* to a whole batch: ``fn(records)`` or ``fn(batch_time_ms, records)``.

        The batch is gathered into one partition; *fn* must be deterministic.
        """
        _check_callable("transform", "fn", fn)
        return self._new("transform", [self], fn=fn, with_time=_arity(fn) >= 2)

    # -- windows -------------------------------------------------------------------------
    def _window_args(self, op: str, window: Duration, slide: Duration | None) -> dict[str, int]:
        iv = self._ssc.batch_interval
        # "window: slide: ..." for window(), "reduce_by_key_and_window: window: ..." elsewhere
        prefix = "" if op == "window" else f"{op}: "
        window_s = to_seconds(window, f"{prefix}window")
        slide_s = iv if slide is None else to_seconds(slide, f"{op}: slide")
        w = _as_batches(window_s, iv, "window", op)
        s = _as_batches(slide_s, iv, "slide", op)
        if s > w:
            msg = (
                f"{op}: slide must not be longer than the window: "
                f"window={window_s:g}s, slide={slide_s:g}s"
            )
            raise GraphError(msg)
        return {"window": w, "slide": s}

    def window(self, window: Duration, slide: Duration | None = None) -> DStream:
        """All records of the last *window* (``"5s"``, or seconds), every *slide*.

        Both are durations (:func:`engine.durations.to_seconds`) and multiples of the batch
        interval; *slide* defaults to the batch interval.
        """
        return self._new("window", [self], **self._window_args("window", window, slide))

    def reduce_by_key_and_window(
        self,
        fn: Callable[[Any, Any], Any],
        inv_fn: Callable[[Any, Any], Any] | None = None,
        window: Duration = 0.0,
        slide: Duration | None = None,
        num_partitions: int | None = None,
        filter_fn: Callable[[Any], bool] | None = None,
    ) -> DStream:
        """Per key, *fn* over the values of the window; incremental when *inv_fn* is given.

        With *inv_fn* the window is updated as in the seed: add the newest slide, subtract
        the slide that left. Keys stay with their (possibly zero) value unless *filter_fn*
        (applied to ``(key, value)``) drops them, as in Spark.
        """
        _check_callable("reduce_by_key_and_window", "fn", fn)
        if inv_fn is not None:
            _check_callable("reduce_by_key_and_window", "inv_fn", inv_fn)
        if filter_fn is not None:
            _check_callable("reduce_by_key_and_window", "filter_fn", filter_fn)
        wa = self._window_args("reduce_by_key_and_window", window, slide)
        n = self._ssc._partitions("reduce_by_key_and_window", num_partitions)
        return self._new(
            "window_reduce",
            [self],
            fn=fn,
            inv_fn=inv_fn,
            filter_fn=filter_fn,
            num_partitions=n,
            **wa,
        )

    def reduce_by_window(
        self,
        fn: Callable[[Any, Any], Any],
        inv_fn: Callable[[Any, Any], Any] | None = None,
        window: Duration = 0.0,
        slide: Duration | None = None,
    ) -> DStream:
        """One record per window: all its records combined with *fn*.

        Without *inv_fn* an empty window gives no record; with *inv_fn* (as in Spark) the
        window's value stays once set, and is the inverse's result after records left.
        """
        keyed = self.map(lambda x: (0, x))
        red = keyed.reduce_by_key_and_window(fn, inv_fn, window, slide, num_partitions=1)
        return red.map(_second)

    def count_by_window(self, window: Duration, slide: Duration | None = None) -> DStream:
        """One record per window: its record count (0 for an empty window)."""
        # count() gives one record per batch, also for an empty batch, so even a window
        # before the first record has its count (0)
        counts = (
            self.count()
            .map(_zero_key)
            .reduce_by_key_and_window(operator.add, operator.sub, window, slide, num_partitions=1)
        )
        return counts.map(_second)

    def count_by_value_and_window(
        self, window: Duration, slide: Duration | None = None, num_partitions: int | None = None
    ) -> DStream:
        return self.map(lambda x: (x, 1)).reduce_by_key_and_window(
            operator.add, operator.sub, window, slide, num_partitions, filter_fn=_nonzero_value
        )

    # -- state ---------------------------------------------------------------------------
    def running_reduce(
        self, fn: Callable[[Any, Any], Any], num_partitions: int | None = None
    ) -> DStream:
        """Per key, the running *fn*-reduction of all values so far (the seed's runningReduce).

        Emits, per batch, ``(key, total)`` for the keys that had values in that batch.
        """
        _check_callable("running_reduce", "fn", fn)
        n = self._ssc._partitions("running_reduce", num_partitions)
        return self._new("state", [self], mode="running_reduce", fn=fn, num_partitions=n)

    def update_state_by_key(
        self, fn: Callable[[list[Any], Any], Any], num_partitions: int | None = None
    ) -> DStream:
        """Spark's updateStateByKey: ``fn(new_values, old_state_or_None) -> state or None``.

        Called every batch for every key with new values or existing state; None deletes
        the key. Emits ``(key, state)`` for the keys whose state changed (``None`` when
        deleted).
        """
        _check_callable("update_state_by_key", "fn", fn)
        n = self._ssc._partitions("update_state_by_key", num_partitions)
        return self._new("state", [self], mode="update_state", fn=fn, num_partitions=n)

    def track(
        self,
        init: Callable[[Any, Any], Any],
        update: Callable[[Any, Any, Any], Any],
        timeout: Duration | None = None,
        num_partitions: int | None = None,
    ) -> DStream:
        """The seed's track: per key state from ``(key, event)`` records.

        ``init(key, event)`` on a key's first event, ``update(key, state, event)`` for each
        later event (in batch order); None deletes the key. A key without events for
        *timeout* (a duration such as ``"30s"``, a multiple of the batch interval) gets one final
        ``update(key, state, TIMEOUT)`` and is dropped; the changelog then carries what that
        call returned. Emits ``(key, state)`` for changed keys (``None`` when deleted).
        """
        _check_callable("track", "init", init)
        _check_callable("track", "update", update)
        t = 0
        if timeout is not None:
            timeout_s = to_seconds(timeout, "track: timeout")
            t = (
                _as_batches(timeout_s, self._ssc.batch_interval, "timeout", "track")
                if timeout_s
                else 0
            )
        n = self._ssc._partitions("track", num_partitions)
        return self._new(
            "state", [self], mode="track", init=init, fn=update, timeout=t, num_partitions=n
        )

    def snapshot(self) -> DStream:
        """The full state of a stateful stream, every batch, as ``(key, state)`` records."""
        if self._node.kind != "state":
            msg = f"snapshot: only stateful streams have a snapshot, not {self._node.kind}"
            raise GraphError(msg)
        return self._new("snapshot", [self])

    # -- outputs -------------------------------------------------------------------------
    def foreach_batch(self, fn: Callable[[int, list[Any]], None]) -> None:
        """Call ``fn(batch_time_ms, records)`` once per batch, with the whole batch.

        Runs where the output task runs (a worker on the fleet); once per batch under the
        commit right, but a crash may repeat it: make *fn* idempotent by batch time.
        """
        _check_callable("foreach_batch", "fn", fn)
        self._new("output", [self], sink="foreach", fn=fn)

    def pprint(self, num: int = 10) -> None:
        """Print the first *num* records of each batch, as Spark's ``pprint``."""
        self._new("output", [self], sink="pprint", num=num)

    def to_kafka(self, topic: str, format: str = "json") -> None:
        """Write each batch exactly once to *topic* (``(key, value)`` records).

        Message key = the key encoded with *format*, value likewise, header
        ``dstream-batch`` = batch time in ms. Transactional: a ``read_committed`` consumer
        sees every batch once.
        """
        if format not in ("json", "msgpack"):
            msg = f"to_kafka: format must be json or msgpack, got {format!r}"
            raise GraphError(msg)
        if not topic:
            msg = "to_kafka: topic must be a non-empty string"
            raise GraphError(msg)
        self._new("output", [self], sink="kafka", topic=topic, format=format)

    def to_redis(self, key_pattern: str = "{key}", mode: str = "set", hash_name: str = "") -> None:
        """Write ``(key, value)`` records to Redis, idempotent by batch.

        ``mode="set"``: ``SET key_pattern.format(key=k) json(v)``; ``mode="hash"``:
        ``HSET hash_name k json(v)``. Keys are prefixed with the app id.
        """
        if mode not in ("set", "hash"):
            msg = f"to_redis: mode must be 'set' or 'hash', got {mode!r}"
            raise GraphError(msg)
        if mode == "hash" and not hash_name:
            msg = "to_redis: mode='hash' needs hash_name"
            raise GraphError(msg)
        self._new(
            "output", [self], sink="redis", key_pattern=key_pattern, mode=mode, hash_name=hash_name
        )


def _is_table(n: Node) -> bool:
    return n.kind == "state" and n.args.get("mode") == "table"


def _zero_key(x: Any) -> tuple[int, Any]:
    return 0, x


def _second(kv: Any) -> Any:
    return kv[1]


def _nonzero_value(kv: Any) -> bool:
    return bool(kv[1] != 0)


def _arity(fn: Callable[..., Any]) -> int:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(
        1
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    )


class StreamingContext:
    """Entry point of an app: holds the batch interval and the graph built by ``build(ssc)``.

    Args:
        batch_interval: the batch interval, a duration (``"1s"``, ``"500ms"``, or seconds).
        num_partitions: default partition count of keyed operators; fixed for the app's
            life, since state partitions are keyed by it.

    """

    def __init__(self, batch_interval: Duration = 1.0, num_partitions: int = 4) -> None:
        iv = to_seconds(batch_interval, "batch interval")
        if not 0.01 <= iv <= 3600:
            msg = f"batch interval must be between 10ms and 1h, got {batch_interval!r}"
            raise GraphError(msg)
        self.batch_interval = iv
        self.num_partitions = self._check_partitions("StreamingContext", num_partitions)
        self.nodes: list[Node] = []
        self._slides: dict[int, int] = {}  # node id -> slide in batches

    @property
    def batch_interval_ms(self) -> int:
        return round(self.batch_interval * 1000)

    @staticmethod
    def _check_partitions(op: str, n: Any) -> int:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            msg = f"{op}: num_partitions must be a positive int, got {n!r}"
            raise GraphError(msg)
        return n

    def _partitions(self, op: str, n: int | None) -> int:
        return self.num_partitions if n is None else self._check_partitions(op, n)

    def _add(self, kind: str, parents: tuple[Node, ...], args: dict[str, Any]) -> DStream:
        slide = self._check_slides(kind, parents, args)
        node = Node(id=len(self.nodes), kind=kind, parents=parents, args=args)
        node.name = f"{kind}#{node.id}"
        self.nodes.append(node)
        self._slides[node.id] = slide
        return DStream(self, node)

    def _check_slides(self, kind: str, parents: tuple[Node, ...], args: dict[str, Any]) -> int:
        """The slide (in batches) of a new node; GraphError when its inputs' slides clash."""
        iv = self.batch_interval
        # a table has a state every batch: a join with one takes the stream's slide
        pp = [self._slides[p.id] for p in (parents[:1] if args.get("table") else parents)]
        if len(set(pp)) > 1:
            shown = ", ".join(f"{x * iv:g}s" for x in pp)
            msg = (
                f"{kind}: inputs have different slide intervals ({shown}); union, join and "
                "cogroup need streams with the same slide (window them alike)"
            )
            raise GraphError(msg)
        base = pp[0] if pp else 1
        if kind not in ("window", "window_reduce"):
            return base
        w, sl = args["window"], args["slide"]
        if w % base or sl % base:
            msg = (
                f"{kind}: window={w * iv:g}s and slide={sl * iv:g}s must be multiples of "
                f"the input stream's slide ({base * iv:g}s)"
            )
            raise GraphError(msg)
        return int(sl)

    # -- sources -------------------------------------------------------------------------
    def kafka_stream(
        self,
        topics: str | Sequence[str],
        value_format: str = "json",
        start: Any = "earliest",
        with_metadata: bool = False,
        stop: Any = None,
    ) -> DStream:
        """Records of Kafka *topics*, decoded with *value_format* (json, msgpack or raw).

        With ``with_metadata`` each record is a dict with ``key``, ``value``, ``topic``,
        ``partition``, ``offset`` and ``timestamp`` (ms). ``start="latest"`` skips history
        on the app's first run, ``start="2026-11-30T12:00:00Z"`` (or an aware datetime)
        starts at the first record stamped at or after it; an app that ran before always
        resumes after its last batch. ``stop="end"`` (the end offsets when the run starts)
        or ``stop=TIMESTAMP`` makes the run bounded: it exits once every partition of
        every bounded source was processed up to there (see :mod:`engine.bounds`).
        """
        names = [topics] if isinstance(topics, str) else list(topics)
        if not names or not all(isinstance(t, str) and t for t in names):
            msg = f"kafka_stream: topics must be non-empty strings, got {topics!r}"
            raise GraphError(msg)
        if value_format not in _VALUE_FORMATS:
            msg = (
                f"kafka_stream: value_format must be one of {_VALUE_FORMATS}, got {value_format!r}"
            )
            raise GraphError(msg)
        from engine.bounds import parse_start, parse_stop

        start_bound = parse_start(start)
        stop_bound = parse_stop(stop)
        if start_bound.kind != "time":
            start = start_bound.kind
        return self._add(
            "source",
            (),
            {
                "source": "kafka",
                "topics": tuple(sorted(set(names))),
                "value_format": value_format,
                "start": start,
                "with_metadata": with_metadata,
                "start_bound": start_bound,
                "stop_bound": stop_bound,
            },
        )

    def queue_stream(
        self, batches: Sequence[Sequence[Any]], default: Sequence[Any] = ()
    ) -> DStream:
        """A test source: batch i holds ``batches[i]`` (then *default* once they run out)."""
        return self._add(
            "source",
            (),
            {"source": "queue", "batches": [list(b) for b in batches], "default": list(default)},
        )

    def table(
        self,
        topic: str | None = None,
        *,
        path: str | None = None,
        updates: DStream | None = None,
        value_format: str = "json",
        num_partitions: int | None = None,
    ) -> DStream:
        """A keyed table that streams join with: ``stream.join(table)``, ``left_outer_join``.

        The table is a stateful stream (last write wins, None deletes) whose state at batch
        t is the file's content plus every update up to and including batch t; the join of
        batch t sees that state. Used as a stream it gives its changelog; ``.snapshot()``
        the whole table.

        Args:
            topic: a (compacted) Kafka topic: key = the record key decoded as UTF-8, value
                decoded with *value_format*; a null value (tombstone) deletes the key. Read
                from the earliest offset on the app's first run, then followed.
            path: a file of JSON lines ``{"key": ..., "value": ...}``, loaded once when the
                graph is built (the table's content at the app's first batch; a null value
                deletes the key of an earlier line).
            updates: instead of *topic*, any stream of ``(key, value)`` records (a
                ``queue_stream`` in tests); value None deletes the key.
            value_format: json, msgpack or raw, for *topic*.
            num_partitions: the table's partitions (default: the context's); a join with
                the table has as many.

        """
        from engine.tables import load_json_lines

        if topic is not None and updates is not None:
            msg = "table: give topic or updates, not both"
            raise GraphError(msg)
        if topic is None and path is None and updates is None:
            msg = "table: give a topic, a path to a JSON-lines file, or an updates stream"
            raise GraphError(msg)
        base = load_json_lines(path) if path is not None else {}
        parents: tuple[Node, ...] = ()
        if topic is not None:
            src = self.kafka_stream(topic, value_format=value_format, with_metadata=True)
            src.node.args["table"] = True  # the source yields (key, value) records
            parents = (src.node,)
        elif updates is not None:
            if updates._ssc is not self:
                msg = "table: updates belong to another StreamingContext"
                raise GraphError(msg)
            if self._slides[updates.node.id] != 1:
                msg = "table: updates must be a stream with a batch every interval, not a window"
                raise GraphError(msg)
            parents = (updates.node,)
        n = self._partitions("table", num_partitions)
        return self._add(
            "state", parents, {"mode": "table", "fn": None, "base": base, "num_partitions": n}
        )

    def validate(self) -> None:
        """Check graph-wide invariants; called when the context starts.

        Raises:
            GraphError: the graph has no source or no output.

        """
        if not any(n.kind == "source" for n in self.nodes):
            msg = "the graph has no input stream: add kafka_stream(...) or queue_stream(...)"
            raise GraphError(msg)
        if not any(n.kind == "output" for n in self.nodes):
            msg = (
                "the graph has no output: add foreach_batch, to_kafka, to_redis or pprint "
                "to a stream"
            )
            raise GraphError(msg)
