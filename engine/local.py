"""The in-process runner: the fleet's planner and scheduler with a local executor.

Public: the test kit (:mod:`engine.testing`) is built on it, and unit tests drive it
directly. :class:`LocalRunner` runs exactly the tasks the fleet would run, over the same
serialized blocks, in the scheduler's order; only the transport is missing.

Blocks are held in a :class:`Blocks` store. The default, :class:`MemoryBlocks`, holds them
in memory sized like the worker's; the worker's own store (``state.blockstore.BlockStore``,
the same store with a byte limit and serialization for peers) can be passed in. The engine
never imports ``state``: ``state`` builds on the engine, not the reverse.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

from engine.codec import encode_input_block
from engine.dispatch import InstructionHandler, apply
from engine.errors import DStreamError
from engine.executor import BlockMissing, Executor, TaskResult, block_size
from engine.graph import StreamingContext
from engine.plan import Plan
from engine.scheduler import FreeBlocks, LaunchTask, ReadInput, Scheduler
from engine.sinks import LocalSinks, SinkEnv

LOCAL = "local"


class Blocks(Protocol):
    """What the runner needs of a block store (``state.blockstore.BlockStore`` is one)."""

    def put(self, block_id: str, block: Any) -> int:
        """Store *block* under *block_id* and return its size; a second put keeps the first."""
        ...

    def get(self, block_id: str, bucket: int = -1) -> Any:
        """The block, or one bucket of a shuffle block; raises :class:`BlockMissing`."""
        ...

    def free(self, block_ids: Iterable[str]) -> int:
        """Drop blocks (missing ones are ignored) and return the bytes freed."""
        ...


class MemoryBlocks:
    """Named immutable blocks in memory, with byte accounting: the runner's default store.

    Sizes are :func:`engine.executor.block_size`, as on a worker, so :attr:`nbytes` is what
    the same blocks would hold there. Thread-safe. The worker's store
    (``state.blockstore.BlockStore``) is this one with a byte limit and serialization for
    peers; :meth:`_admit` is where a subclass refuses a block.
    """

    def __init__(self) -> None:
        self._blocks: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.nbytes = 0

    def _admit(self, size: int) -> None:
        """Called under the lock before *size* more bytes are held; raise to refuse them."""

    def put(self, block_id: str, block: Any, *, replace: bool = False) -> int:
        """Store *block* under *block_id*; returns its size.

        Idempotent (same id, same content: the first copy stays) unless *replace*.
        """
        size = block_size(block)
        with self._lock:
            old = self._sizes.get(block_id)
            if old is not None:
                if not replace:
                    return old
                del self._blocks[block_id], self._sizes[block_id]
                self.nbytes -= old
            self._admit(size)
            self._blocks[block_id] = block
            self._sizes[block_id] = size
            self.nbytes += size
        return size

    def get(self, block_id: str, bucket: int = -1) -> Any:
        """The block, or one bucket of a shuffle block; raises :class:`BlockMissing`."""
        try:
            block = self._blocks[block_id]
        except KeyError:
            raise BlockMissing(block_id) from None
        if bucket >= 0 and isinstance(block, list):
            return block[bucket]
        return block

    def has(self, block_id: str) -> bool:
        return block_id in self._blocks

    def free(self, block_ids: Iterable[str]) -> int:
        """Drop blocks (missing ones are ignored); returns the bytes freed."""
        freed = 0
        with self._lock:
            for bid in block_ids:
                if self._blocks.pop(bid, None) is not None:
                    freed += self._sizes.pop(bid, 0)
            self.nbytes -= freed
        return freed

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)


class LocalRunner(InstructionHandler):
    """Runs a graph batch by batch in this process.

    Args:
        ssc: a context whose graph is built (queue_stream sources only, unless
            ``input_blocks`` are given to :meth:`run_batch`).
        first: the index of the first batch.
        slots: concurrent task slots of the local worker (tasks run one at a time; slots
            only shape the scheduling order, as on a worker).
        store: where blocks are held (default: a new :class:`MemoryBlocks`).

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
        store: Blocks | None = None,
    ) -> None:
        ssc.validate()
        self.ssc = ssc
        self.plan = Plan(ssc.nodes, source_partitions or {})
        self.first = first
        self.executor = Executor(self.plan, first, ssc.batch_interval_ms, fail_on_error)
        self.scheduler = Scheduler(self.plan, first)
        self.scheduler.add_worker(LOCAL, slots)
        self.store: Blocks = store if store is not None else MemoryBlocks()
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
            # blocks are freed as tasks finish (below); the frees of a tick (batches that
            # had no task) are left in the store, as they always were
            apply([i for i in instructions if not isinstance(i, FreeBlocks)], self)
        return b

    def launch(self, ins: LaunchTask) -> None:
        """Run the task here, at once, then report it finished."""
        res = self.executor.run(ins.spec, self.store.get)
        self._finish(ins, res)

    def read_input(self, ins: ReadInput) -> None:
        msg = f"input block {ins.block_id} lost in-process"
        raise DStreamError(msg)

    def free(self, ins: FreeBlocks) -> None:
        self.freed += self.store.free(ins.block_ids)

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
        apply(
            self.scheduler.task_finished(spec.id, ins.attempt, LOCAL, time.monotonic(), size), self
        )

    def run(self, num_batches: int) -> None:
        for _ in range(num_batches):
            self.run_batch()
