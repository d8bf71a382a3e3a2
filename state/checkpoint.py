"""State checkpoints: one interface, a Redis backend and an in-memory backend.

A checkpoint is the serialized state partition of one stateful node at one batch, keyed
by app, node, partition and batch, and split into chunks so that a large partition never
becomes one huge Redis value. Writing is idempotent (the same batch gives the same bytes);
a checkpoint counts only once its pointer is set in the metadata log, after every chunk is
written, so a crash mid-write leaves the previous checkpoint in force.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

from engine.errors import StateError

#: Chunk size: large enough that a partition is a few round trips, small enough that no
#: single Redis value is big (Redis caps values at 512 MiB; big values stall the server).
CHUNK_BYTES = 4 * 1024 * 1024
#: Items per serialized slice of a state partition (about 1 MB for small records).
ITEMS_PER_CHUNK = 20_000


class CheckpointMissing(StateError):
    """The requested checkpoint is not (or no longer) stored."""


class CheckpointStore(ABC):
    """Stores and loads state partitions by (node, partition, batch)."""

    @abstractmethod
    def write_chunks(self, node: int, part: int, batch: int, chunks: list[bytes]) -> int:
        """Store a checkpoint made of *chunks*; returns their count. Idempotent."""

    @abstractmethod
    def read_chunks(self, node: int, part: int, batch: int) -> list[bytes]:
        """The stored chunks, in order; raises :class:`CheckpointMissing`."""

    def write(self, node: int, part: int, batch: int, data: bytes) -> int:
        """Store *data* (split into :data:`CHUNK_BYTES` chunks)."""
        return self.write_chunks(node, part, batch, _chunks(data))

    def read(self, node: int, part: int, batch: int) -> bytes:
        return b"".join(self.read_chunks(node, part, batch))

    def write_items(self, node: int, part: int, batch: int, items: list[Any]) -> int:
        """Store a state partition given as ``(key, value)`` items, serialized in slices.

        Each slice is packed separately and the thread yields between slices, so a large
        partition never holds the interpreter for long (checkpoints run beside tasks).
        Returns the bytes written.
        """
        import time

        from engine.codec import pack

        chunks = []
        for i in range(0, max(len(items), 1), ITEMS_PER_CHUNK):
            chunks.append(pack(items[i : i + ITEMS_PER_CHUNK]))
            time.sleep(0)
        self.write_chunks(node, part, batch, chunks)
        return sum(len(c) for c in chunks)

    def read_items(self, node: int, part: int, batch: int) -> list[Any]:
        from engine.codec import unpack

        out: list[Any] = []
        for c in self.read_chunks(node, part, batch):
            out.extend(unpack(c))
        return out

    @abstractmethod
    def delete_before(self, node: int, part: int, batch: int) -> None:
        """Drop checkpoints of (node, part) older than *batch*."""


class MemoryCheckpointStore(CheckpointStore):
    """In-memory backend for unit tests."""

    def __init__(self) -> None:
        self._data: dict[tuple[int, int, int], list[bytes]] = {}
        self._lock = threading.Lock()

    def write_chunks(self, node: int, part: int, batch: int, chunks: list[bytes]) -> int:
        with self._lock:
            self._data[(node, part, batch)] = list(chunks)
        return len(chunks)

    def read_chunks(self, node: int, part: int, batch: int) -> list[bytes]:
        try:
            return list(self._data[(node, part, batch)])
        except KeyError:
            msg = f"no checkpoint of node {node} partition {part} at batch {batch}"
            raise CheckpointMissing(msg) from None

    def delete_before(self, node: int, part: int, batch: int) -> None:
        with self._lock:
            for key in [k for k in self._data if k[:2] == (node, part) and k[2] < batch]:
                del self._data[key]


class RedisCheckpointStore(CheckpointStore):
    """Redis backend: a hash per checkpoint, field ``n`` = chunk count, fields 0..n-1."""

    def __init__(self, client: Any, app_id: str) -> None:
        self.r = client
        self.prefix = f"dstream:{app_id}:ckpt:"

    def _key(self, node: int, part: int, batch: int) -> str:
        return f"{self.prefix}{node}:{part}:{batch}"

    def write_chunks(self, node: int, part: int, batch: int, chunks: list[bytes]) -> int:
        key = self._key(node, part, batch)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        for i, c in enumerate(chunks):
            pipe.hset(key, str(i), c)
        pipe.hset(key, "n", len(chunks))
        pipe.execute()
        return len(chunks)

    def read_chunks(self, node: int, part: int, batch: int) -> list[bytes]:
        key = self._key(node, part, batch)
        n = self.r.hget(key, "n")
        if n is None:
            msg = f"no checkpoint of node {node} partition {part} at batch {batch}"
            raise CheckpointMissing(msg)
        parts = self.r.hmget(key, [str(i) for i in range(int(n))])
        if any(p is None for p in parts):
            msg = f"checkpoint {key} is incomplete"
            raise CheckpointMissing(msg)
        return list(parts)

    def delete_before(self, node: int, part: int, batch: int) -> None:
        pattern = f"{self.prefix}{node}:{part}:*"
        old = [
            k
            for k in self.r.scan_iter(match=pattern, count=1000)
            if int(k.rsplit(b":", 1)[1]) < batch
        ]
        if old:
            self.r.delete(*old)


def _chunks(data: bytes) -> list[bytes]:
    if not data:
        return [b""]
    return [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
