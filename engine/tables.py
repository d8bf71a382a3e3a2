"""Tables: keyed state that streams join with (``ssc.table``), last write wins.

A table is a stateful stream (``state`` node, mode ``table``): its partition at batch t is
``apply(partition at t-1, updates of batch t)``, starting from the content of its JSON-lines
file, so it is checkpointed, recovered and placed like any state partition. A join with a
table reads the table's partition *p* of the same batch in the join's reduce task *p* (the
join has the table's partition count and both hash keys alike), so the table is never
shuffled.

Public within the engine: :func:`load_json_lines` (called when the graph is built),
:func:`base_partition` and :func:`apply_updates` (called by the executor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from engine.codec import normalize, stable_hash
from engine.errors import GraphError

_KEY_TYPES = (str, int, float, bool)


def load_json_lines(path: str | Path) -> dict[Any, Any]:
    """The table a JSON-lines file describes: one ``{"key": k, "value": v}`` object a line.

    Lines apply in order: a later line replaces the key's value, a null value deletes it.
    Blank lines are skipped. Called once, when ``build(ssc)`` runs, in every process: every
    process must see the same file.

    Raises:
        GraphError: the file cannot be read, or a line is not such an object (the message
            names the file and the line).

    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        msg = f"table: cannot read {path}: {e}"
        raise GraphError(msg) from e
    table: dict[Any, Any] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            msg = f"table: {path} line {i} is not JSON: {e}"
            raise GraphError(msg) from e
        if not isinstance(obj, dict) or "key" not in obj or "value" not in obj:
            msg = f'table: {path} line {i} must be {{"key": ..., "value": ...}}, got {line[:80]}'
            raise GraphError(msg)
        key, value = obj["key"], obj["value"]
        if not isinstance(key, _KEY_TYPES):
            msg = f"table: {path} line {i}: the key must be a string or a number, got {key!r}"
            raise GraphError(msg)
        if value is None:
            table.pop(key, None)
        else:
            table[key] = normalize(value)
    return table


def base_partition(base: dict[Any, Any], part: int, nparts: int) -> dict[Any, Any]:
    """The keys of *base* that hash to partition *part* of *nparts* (as the shuffle does)."""
    return {k: v for k, v in base.items() if stable_hash(k) % nparts == part}


def apply_updates(state: dict[Any, Any], updates: list[tuple[Any, Any]]) -> list[Any]:
    """Apply ``(key, value)`` updates in order (None deletes) to *state*; return the changelog.

    The changelog has one ``(key, value)`` per key updated in the batch, its last value
    (``None`` when the key was deleted and existed before), in first-update order.
    """
    before: dict[Any, Any] = {}
    touched: list[Any] = []
    for key, value in updates:
        if key not in before:
            before[key] = key in state
            touched.append(key)
        if value is None:
            state.pop(key, None)
        else:
            state[key] = normalize(value)
    changes: list[Any] = []
    for key in touched:
        if key in state:
            changes.append((key, state[key]))
        elif before[key]:
            changes.append((key, None))
    return changes
