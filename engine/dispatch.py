"""The one loop that turns scheduler instructions into actions.

Three callers drive :class:`engine.scheduler.Scheduler`: the in-process runner
(:mod:`engine.local`), the fleet's coordinator (``ops/coordinator/dispatch.py``: RPCs to
workers) and the scale benchmark (``bench/scale.py``: simulated workers). Each implements the
:class:`InstructionHandler` methods it needs; :func:`apply` routes every instruction, in
order, to its method. An instruction a handler does not override is ignored (the local
runner has no peer to replicate to, for instance).
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.scheduler import (
    BatchCompleted,
    CancelTask,
    FreeBlocks,
    Instruction,
    LaunchTask,
    ReadInput,
    Replicate,
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
