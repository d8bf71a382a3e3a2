"""The in-process runner: the fleet's planner and scheduler with a local executor.

Used by the test kit and by users' unit tests. It runs exactly the tasks the fleet would
run, over the same serialized blocks; only the transport is missing.
"""

from __future__ import annotations

import time
from typing import Any

from engine._codec import encode_input_block
from engine._exec import Executor, TaskResult
from engine._graph import StreamingContext
from engine._plan import Plan
from engine._scheduler import BatchCompleted, FreeBlocks, LaunchTask, ReadInput, Scheduler
from engine._sinks import LocalSinks, SinkEnv
from engine.errors import DStreamError
from state.blockstore import BlockStore

LOCAL = "local"


class LocalRunner:
    """Runs a graph batch by batch in this process.

    Args:
        ssc: a context whose graph is built (queue_stream sources only, unless
            ``input_blocks`` are given to :meth:`run_batch`).
        first: the index of the first batch.
        slots: concurrent task slots of the local worker (tasks run one at a time; slots
            only shape the scheduling order, as on a worker).

    """

    def __init__(
        self,
        ssc: StreamingContext,
        *,
        first: int = 0,
        sinks: SinkEnv | None = None,
        fail_on_error: bool = False,
        slots: int = 2,
        source_partitions: dict[int, int] | None = None,
    ) -> None:
        ssc.validate()
        self.ssc = ssc
        self.plan = Plan(ssc.nodes, source_partitions or {})
        self.first = first
        self.executor = Executor(self.plan, first, ssc.batch_interval_ms, fail_on_error)
        self.scheduler = Scheduler(self.plan, first)
        self.scheduler.add_worker(LOCAL, slots)
        self.store = BlockStore()
        self.sinks = sinks or LocalSinks()
        self.next_batch = first
        self.freed = 0

    def _queue_block(self, node_id: int, b: int) -> bytes:
        node = self.plan.by_id[node_id]
        batches: list[list[Any]] = node.args["batches"]
        i = b - self.first
        values = batches[i] if 0 <= i < len(batches) else node.args["default"]
        return encode_input_block("", 0, b, b + 1, list(values))

    def run_batch(self, input_blocks: dict[str, bytes] | None = None) -> int:
        """Seal the next batch's input, run all its tasks, commit its outputs."""
        b = self.next_batch
        self.next_batch += 1
        now = time.monotonic()
        self.scheduler.add_batch(b, now)
        for n in self.plan.nodes:
            if n.kind == "source" and n.args["source"] == "queue":
                bid = f"in/{n.id}/{b}/0"
                self.scheduler.block_added(
                    bid, LOCAL, self.store.put(bid, self._queue_block(n.id, b))
                )
        for bid, data in (input_blocks or {}).items():
            self.scheduler.block_added(bid, LOCAL, self.store.put(bid, data))
        while b in self.scheduler.batches:
            instructions = self.scheduler.tick(time.monotonic())
            if not instructions:
                msg = f"batch {b} cannot progress: no task is ready (missing input?)"
                raise DStreamError(msg)
            for ins in instructions:
                self._handle(ins)
        return b

    def _handle(self, ins: Any) -> None:
        if isinstance(ins, LaunchTask):
            res = self.executor.run(ins.spec, self.store.get)
            self._finish(ins, res)
        elif isinstance(ins, ReadInput):
            msg = f"input block {ins.block_id} lost in-process"
            raise DStreamError(msg)

    def _finish(self, ins: LaunchTask, res: TaskResult) -> None:
        spec = ins.spec
        size = 0
        if spec.kind == "output":
            if self.scheduler.request_commit(spec.id, ins.attempt) != "granted":
                return
            node = self.plan.by_id[spec.node]
            self.sinks.commit(node, spec, spec.batch * self.ssc.batch_interval_ms, res.records)
        else:
            size = self.store.put(spec.id, res.block)
        if res.dead_letters:
            self.sinks.dead_letters(res.dead_letters)
        for out in self.scheduler.task_finished(
            spec.id, ins.attempt, LOCAL, time.monotonic(), size
        ):
            if isinstance(out, FreeBlocks):
                self.freed += self.store.free(out.block_ids)
            elif isinstance(out, BatchCompleted):
                pass
            else:
                self._handle(out)

    def run(self, num_batches: int) -> None:
        for _ in range(num_batches):
            self.run_batch()
