"""Indexes that keep the scheduler's per-event cost independent of the fleet's size.

Internal to :mod:`engine.scheduler`:

* :class:`SlotIndex`: free slots per live worker, and the worker with the most free slots
  (ties: the first by name) without walking every worker;
* :func:`split_inputs`: a reduce task's inputs as whole map stages (shuffle groups) plus a
  few other blocks, so that a reduce waits on a counter per map stage instead of on each
  of its map outputs (as Spark's ``MapOutputTracker`` tracks a shuffle's map outputs).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.plan import ShuffleInputs


class SlotIndex:
    """Free slots per live worker, read from ``slots`` and ``busy``.

    ``best()`` answers "the worker with the most free slots, the first by name among
    equals" in O(log W) amortized: one min-heap of names per free-slot count, entries made
    stale by a later change skipped when they reach the top (and the heap rebuilt when
    stale entries outnumber live workers). Every change of ``busy`` goes through
    :meth:`take` and :meth:`release` so the heaps stay in step.

    Workers set apart with :meth:`avoid` (caught straggling) sit in heaps of their own,
    looked at only when no other worker has a free slot: passing them over costs nothing
    per launch (it cost a pop and a push per avoided worker at the top of the heap).
    """

    __slots__ = ("_avoid", "_free", "_levels", "busy", "slots", "top")

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.busy: dict[str, int] = {}
        #: slots - busy per live worker, kept in step (read on every launch)
        self._free: dict[str, int] = {}
        #: per tier (0: preferred, 1: avoided), per free-slot count, a heap of names
        self._levels: tuple[dict[int, list[str]], dict[int, list[str]]] = ({}, {})
        self._avoid: frozenset[str] = frozenset()
        self.top = 0

    # -- reads -----------------------------------------------------------------------------
    def get(self, w: str, default: int = 0) -> int:
        return self._free.get(w, default)

    def __getitem__(self, w: str) -> int:
        return self._free[w]

    def items(self) -> Iterable[tuple[str, int]]:
        busy = self.busy
        return ((w, n - busy.get(w, 0)) for w, n in self.slots.items())

    def any(self) -> bool:
        """Whether some live worker has a free slot."""
        return self.best() is not None

    def best(self, exclude: Iterable[str] = (), avoided: bool = True) -> str | None:
        """The worker with the most free slots (ties: first by name), not in *exclude*.

        Workers set apart by :meth:`avoid` are picked only when no other worker has a free
        slot, and never with ``avoided=False``.
        """
        ex = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        free = self._free
        for levels in self._levels if avoided else self._levels[:1]:
            for k in range(self.top, 0, -1):
                heap = levels.get(k)
                if not heap:
                    continue
                put_back: list[str] = []
                found: str | None = None
                while heap:
                    w = heap[0]
                    if free.get(w, -1) != k:
                        heapq.heappop(heap)  # stale: that worker's free count changed since
                        continue
                    if w in ex:
                        put_back.append(heapq.heappop(heap))
                        continue
                    found = w
                    break
                for w in put_back:
                    heapq.heappush(heap, w)
                if found is not None:
                    return found
        return None

    # -- changes ---------------------------------------------------------------------------
    def avoid(self, workers: frozenset[str]) -> None:
        """Set apart *workers* (the set replaces the last one); O(W log W) when it changes."""
        if workers == self._avoid:
            return
        self._avoid = workers
        self._levels = ({}, {})
        for w in sorted(self._free):
            self._push(w)

    def add(self, w: str, slots: int) -> None:
        self.slots[w] = slots
        self.top = max(self.slots.values())
        self.busy.setdefault(w, 0)
        self._free[w] = slots - self.busy[w]
        self._push(w)

    def remove(self, w: str) -> None:
        self.slots.pop(w, None)
        self.busy.pop(w, None)
        self._free.pop(w, None)
        self.top = max(self.slots.values(), default=0)

    def take(self, w: str) -> None:
        """An attempt was launched on *w*."""
        self.busy[w] = n = self.busy.get(w, 0) + 1
        if w in self.slots:
            self._free[w] = self.slots[w] - n
        self._push(w)

    def release(self, w: str) -> None:
        """An attempt on *w* ended (finished, failed or cancelled)."""
        self.busy[w] = n = max(0, self.busy.get(w, 1) - 1)
        if w in self.slots:
            self._free[w] = self.slots[w] - n
        self._push(w)

    def _push(self, w: str) -> None:
        n = self._free.get(w, 0)
        if n <= 0:
            return
        levels = self._levels[w in self._avoid]
        heap = levels.get(n)
        if heap is None:
            heap = levels[n] = []
        heapq.heappush(heap, w)
        if len(heap) > 2 * len(self.slots) + 64:
            live = sorted({x for x in heap if self._free.get(x, -1) == n})
            levels[n] = live  # a sorted list is a heap


@dataclass(frozen=True)
class InputSplit:
    """A task's inputs as whole shuffle groups plus the positions of its other inputs.

    Attributes:
        groups: ``(group, count, start)`` per map stage read: the task reads blocks
            ``{group}/0`` .. ``{group}/{count - 1}``, at positions ``start`` onwards.
        others: positions of the inputs outside any group (a previous state partition).

    """

    groups: tuple[tuple[str, int, int], ...]
    others: tuple[int, ...]

    def matches(self, inputs: Sequence[tuple[str, int]]) -> bool:
        """Cheap check that *inputs* has this shape (first and last block of each group)."""
        if isinstance(inputs, ShuffleInputs):
            return len(inputs.stages) == len(self.groups) and all(
                g == sg and count == sc
                for (g, count, _), (sg, sc) in zip(self.groups, inputs.stages, strict=True)
            )
        n = len(inputs)
        for g, count, start in self.groups:
            end = start + count - 1
            if end >= n or inputs[start][0] != f"{g}/0" or inputs[end][0] != f"{g}/{count - 1}":
                return False
        return True


def shuffle_group(block_id: str) -> str | None:
    """The map stage a shuffle block belongs to (``sh/{node}/{side}/{batch}``), else None."""
    if not block_id.startswith("sh/"):
        return None
    return block_id[: block_id.rfind("/")]


def _split_stages(inputs: ShuffleInputs) -> InputSplit:
    groups: list[tuple[str, int, int]] = []
    start = 0
    for stage, count in inputs.stages:
        groups.append((stage, count, start))
        start += count
    return InputSplit(tuple(groups), tuple(range(start, len(inputs))))


def split_inputs(inputs: Sequence[tuple[str, int]]) -> InputSplit | None:
    """Split a reduce's inputs into shuffle groups and other blocks; None if they don't fit.

    A group qualifies when its blocks are consecutive and numbered 0..count-1 in order (as
    :meth:`engine.plan.Plan.tasks_for_batch` lists every map output of a stage). Inputs
    named by stage (:class:`engine.plan.ShuffleInputs`, what the planner makes) are split in
    O(stages); others cost one pass: callers cache the result per (node, batch).
    """
    if isinstance(inputs, ShuffleInputs):
        return _split_stages(inputs)
    groups: list[tuple[str, int, int]] = []
    others: list[int] = []
    cur: str | None = None
    count = start = 0
    closed: set[str] = set()
    for i, (bid, _bucket) in enumerate(inputs):
        g = shuffle_group(bid)
        if g is None:
            others.append(i)
            if cur is not None:  # a group ends where another input starts
                groups.append((cur, count, start))
                closed.add(cur)
                cur = None
            continue
        if g != cur:
            if cur is not None:
                groups.append((cur, count, start))
                closed.add(cur)
            if g in closed:
                return None
            cur, count, start = g, 0, i
        if bid[len(g) + 1 :] != str(count):
            return None
        count += 1
    if cur is not None:
        groups.append((cur, count, start))
    if not groups:
        return None
    return InputSplit(tuple(groups), tuple(others))
