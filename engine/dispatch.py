"""The one loop that turns scheduler instructions into actions.

Three callers drive :class:`engine.scheduler.Scheduler`: the in-process runner
(:mod:`engine.local`), the fleet's coordinator (``ops/coordinator/dispatch.py``: RPCs to
workers) and the scale benchmark (``bench/scale.py``: simulated workers). Each implements the
:class:`InstructionHandler` methods it needs; :func:`apply` routes every instruction, in
order, to its method. An instruction a handler does not override is ignored (the local
runner has no peer to replicate to, for instance).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from engine.scheduler import (
    LAUNCH_CHUNK,
    BatchCompleted,
    CancelTask,
    FreeBlocks,
    Instruction,
    LaunchTask,
    ReadInput,
    Replicate,
    Scheduler,
)


class InstructionHandler:
    """Executes scheduler instructions; each method handles one instruction type."""

    def launch(self, ins: LaunchTask) -> None:
        """Run one attempt of a task on ``ins.worker``."""

    def cancel(self, ins: CancelTask) -> None:
        """Discard an attempt another one beat."""

    def free(self, ins: FreeBlocks) -> None:
        """Drop blocks nothing needs any more from ``ins.worker``."""

    def replicate(self, ins: Replicate) -> None:
        """Copy a block that lost its second holder."""

    def read_input(self, ins: ReadInput) -> None:
        """Rebuild an input block that has no live holder."""

    def batch_completed(self, ins: BatchCompleted) -> None:
        """Every output of a batch committed."""


def apply(instructions: Iterable[Instruction], handler: InstructionHandler) -> None:
    """Hand every instruction, in order, to the *handler* method of its type."""
    for ins in instructions:
        if isinstance(ins, LaunchTask):
            handler.launch(ins)
        elif isinstance(ins, FreeBlocks):
            handler.free(ins)
        elif isinstance(ins, CancelTask):
            handler.cancel(ins)
        elif isinstance(ins, BatchCompleted):
            handler.batch_completed(ins)
        elif isinstance(ins, ReadInput):
            handler.read_input(ins)
        elif isinstance(ins, Replicate):
            handler.replicate(ins)


def tick_once(
    scheduler: Scheduler, handler: InstructionHandler, now: float, limit: int = LAUNCH_CHUNK
) -> bool:
    """One tick of at most *limit* launches, applied; whether it hit the limit (tick again)."""
    out = scheduler.tick(now, limit)
    apply(out, handler)
    return sum(1 for i in out if type(i) is LaunchTask) >= limit


def dispatch(scheduler: Scheduler, handler: InstructionHandler, clock: Callable[[], float]) -> None:
    """Tick and apply until a tick launches fewer than ``LAUNCH_CHUNK`` tasks.

    Launches go out in chunks as they are placed: a batch's first tasks leave while the
    rest of its first wave (2,000 tasks at 1,000 workers) is placed.
    """
    while tick_once(scheduler, handler, clock()):
        pass
