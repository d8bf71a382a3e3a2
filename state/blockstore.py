"""The worker block store: named immutable blocks in memory, with byte accounting.

A block is ``bytes`` (input blocks, persisted partitions), ``list[bytes]`` (map-side shuffle
output, one item per reduce bucket) or a state partition object. Blocks are never mutated;
:meth:`BlockStore.free` drops the ones the coordinator says nothing reads any more. Only an
input block may be *replaced* (``replace=True``): the logged offset range, not the first copy
that arrived, is what its id stands for (a worker paused mid-seal can leave a copy cut from a
range that was never logged). The
store's size is observable (:attr:`BlockStore.nbytes`, the ``dstream_block_store_bytes``
gauge) and bounded: past ``limit_bytes`` a put raises instead of growing without end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from engine.errors import StateError
from engine.executor import BlockMissing, StateBlock, block_size


class BlockStoreFull(StateError):
    """The store would exceed its byte limit."""


class BlockStore:
    """Thread-safe in-memory block store.

    Args:
        limit_bytes: upper bound on held bytes (0 = unbounded).

    """

    def __init__(self, limit_bytes: int = 0) -> None:
        self._blocks: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.limit_bytes = limit_bytes
        self.nbytes = 0

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
            if self.limit_bytes and self.nbytes + size > self.limit_bytes:
                msg = (
                    f"block store full: {self.nbytes} + {size} bytes > limit "
                    f"{self.limit_bytes} bytes (raise the worker memory or lower the rate)"
                )
                raise BlockStoreFull(msg)
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

    def get_bytes(self, block_id: str, bucket: int = -1) -> bytes:
        """The block serialized for a peer (state partitions are serialized on demand)."""
        block = self.get(block_id, bucket)
        if isinstance(block, StateBlock):
            return block.to_bytes()
        if isinstance(block, list):
            from engine.codec import pack

            return pack(block)
        return bytes(block)

    def has(self, block_id: str) -> bool:
        return block_id in self._blocks

    def free(self, block_ids: Iterable[str]) -> int:
        """Drop blocks (missing ones are ignored); returns the bytes freed."""
        freed = 0
        with self._lock:
            for bid in block_ids:
                if self._blocks.pop(bid, None) is not None:
                    size = self._sizes.pop(bid, 0)
                    freed += size
            self.nbytes -= freed
        return freed

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)
