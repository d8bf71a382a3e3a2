"""Queries on live state: which streams answer them, and how one partition is read.

A stream named in the app (``.name("counts")``) answers ``dstream query`` and ``GET
/api/state/{stream}`` when it holds state: a ``running_reduce``, ``update_state_by_key`` or
``track`` stream (its state), a ``reduce_by_key_and_window`` stream (the window's
``(key, value)`` pairs) or a ``window`` stream (the window's records). The answer is
consistent as of one completed batch: every partition is read at that batch (for windows,
the last batch where the window ended).

Pure functions: the worker reads a partition with :func:`read_partition` and selects from
it with :func:`select`; the coordinator checks the stream with :func:`find_stream`, reads a
checkpoint with :func:`checkpoint_items` and merges the partitions' answers with
:func:`merge`. Keys are matched by their text (:func:`key_text`): a string key is itself,
any other key its compact JSON (``42``, ``["a",1]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from engine.errors import DStreamError
from engine.executor import Executor, StateBlock, _Ctx
from engine.graph import Node, is_stream_name

#: Entries a scan returns when the query names no limit.
DEFAULT_LIMIT = 100
#: The largest limit a scan accepts (an answer is one RPC message and one HTTP body).
MAX_LIMIT = 10_000

#: Node kinds whose state a query reads, by what the answer holds.
_KINDS = {"state": "state", "window_combine": "window_reduce", "window": "window"}


class QueryError(DStreamError):
    """A query that cannot be answered (now, or at all); ``status`` is its HTTP code.

    404: no stream of that name; 400: the stream holds no state, or a bad argument; 503: no
    batch completed yet, or the state is being rebuilt (ask again).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def named_streams(nodes: Iterable[Node]) -> dict[str, Node]:
    """The streams the app named with ``.name(...)``, by name."""
    return {n.name: n for n in nodes if is_stream_name(n.name)}


def query_kind(node: Node) -> str | None:
    """``state``, ``window_reduce`` or ``window`` for a queryable node, else None."""
    return _KINDS.get(node.kind)


def find_stream(nodes: Iterable[Node], name: str) -> Node:
    """The queryable node named *name*.

    Raises:
        QueryError: no stream has that name (the names are listed; 404), or the stream
            holds no state (400).

    """
    streams = named_streams(nodes)
    node = streams.get(name)
    if node is None:
        shown = ", ".join(sorted(streams)) or "none: name a stream with .name('counts')"
        msg = f"unknown stream {name!r}; the app's named streams: {shown}"
        raise QueryError(msg, 404)
    if query_kind(node) is None:
        queryable = sorted(k for k, n in streams.items() if query_kind(n) is not None)
        msg = (
            f"stream {name!r} is a {node.kind} stream and holds no state; queries read "
            "running_reduce, update_state_by_key, track, reduce_by_key_and_window and window "
            f"streams (named here: {', '.join(queryable) or 'none'})"
        )
        raise QueryError(msg, 400)
    return node


def check_limit(limit: int | None) -> int:
    """The scan limit to use (:data:`DEFAULT_LIMIT` when None); QueryError when out of range."""
    if limit is None:
        return DEFAULT_LIMIT
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        msg = f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}"
        raise QueryError(msg, 400)
    return limit


def key_text(key: Any) -> str:
    """The text a query matches *key* by: a string itself, anything else its compact JSON."""
    if isinstance(key, str):
        return key
    return json.dumps(jsonable(key), separators=(",", ":"), sort_keys=True)


def jsonable(x: Any) -> Any:
    """*x* as JSON-friendly values (tuples as lists, bytes as text, others by ``repr``)."""
    if x is None or isinstance(x, str | bool | int | float):
        return x
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {key_text(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, bytes | bytearray):
        return bytes(x).decode("utf-8", errors="replace")
    return repr(x)


def _state_items(node: Node, state: dict[Any, Any]) -> list[Any]:
    if node.args.get("mode") == "track":  # track keeps (state, last batch seen)
        return [(k, v[0]) for k, v in state.items()]
    return list(state.items())


def read_partition(executor: Executor, node: Node, batch: int, part: int, fetch: Any) -> list[Any]:
    """Partition *part* of a queryable *node* at *batch*: ``(key, value)`` items or records.

    *fetch* is a task's block reader (``fetch(block_id, bucket)``); it raises
    :class:`engine.executor.BlockMissing` when a block is not available, and the query is
    then answered elsewhere. Reading is pure: it changes no block.
    """
    if node.kind == "state":
        blk = fetch(f"rd/{node.id}/{batch}/{part}", -1)
        if not isinstance(blk, StateBlock):
            blk = StateBlock.from_bytes(blk)
        return _state_items(node, blk.state)
    ctx = _Ctx(batch, executor.first, executor.interval_ms, False)
    return list(executor.read(node, batch, part, fetch, ctx))


def checkpoint_items(node: Node, items: list[Any]) -> list[Any]:
    """A partition's items as read from its checkpoint (the same shape as live state)."""
    if node.kind == "state":
        return _state_items(node, {_hashable(k): v for k, v in items})
    return list(items)


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def _entry_key(kind: str, entry: Any) -> tuple[bool, Any]:
    """(has a key, the key) of an entry: state items always, window records when pairs."""
    if kind != "window":
        return True, entry[0]
    if isinstance(entry, list | tuple) and len(entry) == 2:
        return True, entry[0]
    return False, None


def select(
    kind: str,
    entries: Iterable[Any],
    keys: Sequence[str] = (),
    prefix: str = "",
    limit: int = DEFAULT_LIMIT,
) -> tuple[list[Any], bool]:
    """The entries a query asks for, JSON-friendly, and whether a scan left some out.

    With *keys*: the entries whose key text is one of them (all of them, for windows whose
    records share a key). Without: a scan of the entries whose key text starts with
    *prefix*, in key-text order, at most *limit* (records of a window that are not
    ``(key, value)`` pairs are only in a scan without a prefix).
    """
    wanted = set(keys)
    out: list[tuple[str, Any]] = []
    for e in entries:
        keyed, k = _entry_key(kind, e)
        text = key_text(k) if keyed else ""
        if wanted:
            if keyed and text in wanted:
                out.append((text, e))
        elif (keyed and text.startswith(prefix)) or not prefix:
            out.append((text, e))
    out.sort(key=_first)
    more = not wanted and len(out) > limit
    if more:
        del out[limit:]
    return [jsonable(e) for _, e in out], more


def _first(te: tuple[str, Any]) -> str:
    return te[0]


def _sort_text(kind: str, entry: Any) -> str:
    keyed, k = _entry_key(kind, entry)
    return key_text(k) if keyed else ""


def merge(
    kind: str, parts: Sequence[tuple[list[Any], bool]], keys: Sequence[str], limit: int
) -> tuple[list[Any], bool]:
    """The partitions' selections as one answer, in key-text order (a scan cut at *limit*)."""
    allp = [e for entries, _ in parts for e in entries]
    allp.sort(key=lambda e: _sort_text(kind, e))
    more = any(m for _, m in parts)
    if not keys and len(allp) > limit:
        del allp[limit:]
        more = True
    return allp, more
