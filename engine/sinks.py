"""Output sinks: what an output task does with its records once it holds the commit right.

Engine-side sinks (``foreach_batch``, ``pprint``) run here; Kafka and Redis sinks need
clients, so the process provides a :class:`SinkEnv` that commits them (``ops/sinks.py``).

Public: :class:`SinkEnv` is the extension point a process implements (:class:`LocalSinks`
in-process and in the test kit, ``ops.sinks.FleetSinks`` on a worker);
:func:`run_engine_sink` runs the engine-side sinks for either.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from engine.errors import DStreamError
from engine.executor import DeadLetter
from engine.graph import Node
from engine.plan import TaskSpec


class SinkEnv(ABC):
    """Commits output partitions to external systems, exactly once per (batch, partition)."""

    @abstractmethod
    def commit(
        self,
        node: Node,
        spec: TaskSpec,
        batch_time_ms: int,
        records: list[Any],
        guard: Callable[[], bool] | None = None,
    ) -> None:
        """Write *records* of output task *spec*; idempotent for the same batch.

        *guard*, when given, is asked right before the write becomes visible; False means
        the caller lost its right to commit, and nothing may be written.
        """

    def dead_letters(self, letters: list[DeadLetter]) -> None:
        """Publish dead letters; the default keeps them in memory (tests read them)."""
        self.dead.extend(letters)

    @property
    def dead(self) -> list[DeadLetter]:
        if not hasattr(self, "_dead"):
            self._dead: list[DeadLetter] = []
        return self._dead


class LocalSinks(SinkEnv):
    """foreach_batch and pprint; Kafka and Redis outputs need the fleet's sinks."""

    def commit(
        self,
        node: Node,
        spec: TaskSpec,
        batch_time_ms: int,
        records: list[Any],
        guard: Callable[[], bool] | None = None,
    ) -> None:
        run_engine_sink(node, batch_time_ms, records)


def run_engine_sink(node: Node, batch_time_ms: int, records: list[Any]) -> bool:
    """Run a foreach/pprint sink; False when the sink is not an engine-side one."""
    sink = node.args["sink"]
    if sink == "foreach":
        node.args["fn"](batch_time_ms, records)
        return True
    if sink == "pprint":
        print(format_pprint(batch_time_ms, records, node.args["num"]), flush=True)
        return True
    if sink in ("kafka", "redis"):
        msg = f"{node.name}: {sink} output needs the fleet's sinks (run with dstream run)"
        raise DStreamError(msg)
    return False


def format_pprint(batch_time_ms: int, records: list[Any], num: int) -> str:
    """Spark's pprint layout: a header with the batch time, then up to *num* records."""
    when = dt.datetime.fromtimestamp(batch_time_ms / 1000, tz=dt.UTC).strftime(
        "%Y-%m-%d %H:%M:%S.%f"
    )[:-3]
    lines = ["-" * 43, f"Time: {when}", "-" * 43]
    lines += [repr(r) for r in records[:num]]
    if len(records) > num:
        lines.append("...")
    lines.append("")
    return "\n".join(lines)
