"""Where a Kafka source starts and where a bounded run stops (pure parsing, no I/O).

``kafka_stream(..., start=, stop=)`` and ``dstream run APP --until`` take these forms:

* start: ``"earliest"`` (default), ``"latest"``, or an instant (an ISO 8601 timestamp such
  as ``"2026-11-30T12:00:00Z"``, or a timezone-aware :class:`datetime.datetime`): the
  first offset whose record timestamp is at or after it (Kafka's ``offsetsForTimes``);
* stop: ``None`` (unbounded, the default), ``"end"`` (the end offsets of each partition
  when the run starts), or an instant: the first offset whose timestamp is at or after it,
  which is excluded (``until`` is exclusive, as everywhere in this codebase).

The coordinator turns a :class:`Bound` into one offset per partition once, at the first
start of a run, and keeps those offsets in the metadata log, so a restarted or new
leader stops at the same place.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from engine.errors import GraphError

__all__ = ["Bound", "parse_instant", "parse_start", "parse_stop"]

_KINDS = ("earliest", "latest", "end", "time")


@dataclass(frozen=True)
class Bound:
    """One end of a source's range: ``kind`` is earliest, latest, end or time."""

    kind: str
    #: the instant (ms since the epoch, UTC) of a ``time`` bound, else None
    time_ms: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS or (self.kind == "time") != (self.time_ms is not None):
            msg = f"bad bound {self.kind!r} / {self.time_ms!r}"
            raise GraphError(msg)

    def describe(self) -> str:
        """How a user wrote it (logs and the summary line)."""
        if self.time_ms is None:
            return self.kind
        when = dt.datetime.fromtimestamp(self.time_ms / 1000, tz=dt.UTC)
        return when.isoformat().replace("+00:00", "Z")


def parse_instant(value: Any, what: str = "timestamp") -> int:
    """An ISO 8601 timestamp with a zone, or an aware datetime, as ms since the epoch.

    Raises:
        GraphError: not a timestamp, or one without a timezone (ambiguous: say ``Z``).

    """
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            when = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError:
            msg = f"{what}: {value!r} is not an ISO 8601 timestamp (e.g. '2026-11-30T12:00:00Z')"
            raise GraphError(msg) from None
    else:
        msg = f"{what}: expected an ISO 8601 timestamp or a datetime, got {value!r}"
        raise GraphError(msg)
    if when.tzinfo is None:
        msg = f"{what}: {value!r} has no timezone: add one, e.g. 'Z' for UTC"
        raise GraphError(msg)
    return int(when.timestamp() * 1000)


def parse_start(value: Any) -> Bound:
    """A source's ``start``: earliest, latest, or an instant (see the module docstring)."""
    if value in ("earliest", "latest"):
        return Bound(value)
    if isinstance(value, str | dt.datetime):
        return Bound("time", parse_instant(value, "kafka_stream: start"))
    msg = (
        f"kafka_stream: start must be 'earliest', 'latest' or an ISO 8601 timestamp, got {value!r}"
    )
    raise GraphError(msg)


def parse_stop(value: Any, what: str = "kafka_stream: stop") -> Bound | None:
    """A source's ``stop`` (or ``--until``): None, ``"end"``, or an instant."""
    if value is None:
        return None
    if value == "end":
        return Bound("end")
    if isinstance(value, str | dt.datetime):
        return Bound("time", parse_instant(value, what))
    msg = f"{what} must be 'end' or an ISO 8601 timestamp, got {value!r}"
    raise GraphError(msg)
