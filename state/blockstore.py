"""The worker block store: named immutable blocks in memory, with byte accounting.

A block is ``bytes`` (input blocks, persisted partitions), ``list[bytes]`` (map-side shuffle
output, one item per reduce bucket) or a state partition object. Blocks are never mutated;
:meth:`BlockStore.free` drops the ones the coordinator says nothing reads any more. Only an
input block may be *replaced* (``replace=True``): the logged offset range, not the first copy
that arrived, is what its id stands for (a worker paused mid-seal can leave a copy cut from a
range that was never logged). The store's size is observable (:attr:`BlockStore.nbytes`, the
``dstream_block_store_bytes`` gauge) and bounded: past ``limit_bytes`` a put raises instead
of growing without end.

The accounting is the in-process runner's (:class:`engine.local.MemoryBlocks`), so a local
run and a worker size the same blocks alike.
"""

from __future__ import annotations

from engine.errors import StateError
from engine.executor import StateBlock
from engine.local import MemoryBlocks


class BlockStoreFull(StateError):
    """The store would exceed its byte limit."""


class BlockStore(MemoryBlocks):
    """Thread-safe in-memory block store with a byte limit.

    Args:
        limit_bytes: upper bound on held bytes (0 = unbounded).

    """

    def __init__(self, limit_bytes: int = 0) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes

    def _admit(self, size: int) -> None:
        if self.limit_bytes and self.nbytes + size > self.limit_bytes:
            msg = (
                f"block store full: {self.nbytes} + {size} bytes > limit "
                f"{self.limit_bytes} bytes (raise the worker memory or lower the rate)"
            )
            raise BlockStoreFull(msg)

    def get_bytes(self, block_id: str, bucket: int = -1) -> bytes:
        """The block serialized for a peer (state partitions are serialized on demand)."""
        block = self.get(block_id, bucket)
        if isinstance(block, StateBlock):
            return block.to_bytes()
        if isinstance(block, list):
            from engine.codec import pack

            return pack(block)
        return bytes(block)
