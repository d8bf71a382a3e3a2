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


class SlotIndex:
    """Free slots per live worker, read from ``slots`` and ``busy``.

    ``best()`` answers "the worker with the most free slots, the first by name among
    equals" in O(log W) amortized: one min-heap of names per free-slot count, entries made
    stale by a later change skipped when they reach the top (and the heap rebuilt when
    stale entries outnumber live workers). Every change of ``busy`` goes through
    :meth:`take` and :meth:`release` so the heaps stay in step.
    """

    __slots__ = ("_levels", "busy", "slots", "top")

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.busy: dict[str, int] = {}
        self._levels: dict[int, list[str]] = {}
        self.top = 0

    # -- reads -----------------------------------------------------------------------------
    def get(self, w: str, default: int = 0) -> int:
        n = self.slots.get(w)
        return default if n is None else n - self.busy.get(w, 0)

    def __getitem__(self, w: str) -> int:
        return self.slots[w] - self.busy.get(w, 0)

    def items(self) -> Iterable[tuple[str, int]]:
        busy = self.busy
        return ((w, n - busy.get(w, 0)) for w, n in self.slots.items())

    def any(self) -> bool:
        """Whether some live worker has a free slot."""
        return self.best() is not None

    def best(self, exclude: Iterable[str] = ()) -> str | None:
        """The worker with the most free slots (ties: first by name), not in *exclude*."""
        ex = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        for k in range(self.top, 0, -1):
            heap = self._levels.get(k)
            if not heap:
                continue
            put_back: list[str] = []
            found: str | None = None
            while heap:
                w = heap[0]
                if self.get(w, -1) != k:
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
    def add(self, w: str, slots: int) -> None:
        self.slots[w] = slots
        self.top = max(self.slots.values())
        self.busy.setdefault(w, 0)
        self._push(w)

    def remove(self, w: str) -> None:
        self.slots.pop(w, None)
        self.busy.pop(w, None)
        self.top = max(self.slots.values(), default=0)

    def take(self, w: str) -> None:
        """An attempt was launched on *w*."""
        self.busy[w] = self.busy.get(w, 0) + 1
        self._push(w)

    def release(self, w: str) -> None:
        """An attempt on *w* ended (finished, failed or cancelled)."""
        self.busy[w] = max(0, self.busy.get(w, 1) - 1)
        self._push(w)

    def _push(self, w: str) -> None:
        n = self.get(w)
        if n <= 0:
            return
        heap = self._levels.setdefault(n, [])
        heapq.heappush(heap, w)
        if len(heap) > 2 * len(self.slots) + 64:
            live = sorted({x for x in heap if self.get(x, -1) == n})
            self._levels[n] = live  # a sorted list is a heap


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


def split_inputs(inputs: Sequence[tuple[str, int]]) -> InputSplit | None:
    """Split a reduce's inputs into shuffle groups and other blocks; None if they don't fit.

    A group qualifies when its blocks are consecutive and numbered 0..count-1 in order (as
    :meth:`engine.plan.Plan.tasks_for_batch` lists every map output of a stage). Costs one
    pass over the inputs: callers cache the result per (node, batch).
    """
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
