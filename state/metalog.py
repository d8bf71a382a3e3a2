"""The metadata log: what the coordinator must find again after a restart.

Per app (every key is prefixed ``dstream:{app_id}:``):

* ``epoch``: bumped by every coordinator start; writes carrying an older epoch are fenced;
* ``first``: the app's first batch index (set once);
* ``batches``: batch index -> msgpack ``{block_id: [topic, partition, from, until, count]}``,
  written **before** the batch is scheduled (Kafka is the durable log; ``until`` exclusive);
* ``done``: the highest batch such that it and every batch before it completed;
* ``checkpoints``: ``node:partition`` -> batch of the last complete state checkpoint.

One interface, two backends: :class:`RedisMetaLog` and :class:`MemoryMetaLog` (unit tests).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

from engine._codec import pack, unpack
from engine.errors import FencedError

OffsetRange = tuple[str, int, int, int, int]  # topic, partition, from, until, count


class MetaLog(ABC):
    """The coordinator's durable metadata."""

    @abstractmethod
    def bump_epoch(self) -> int:
        """Start a new coordinator epoch; returns it (strictly larger than any before)."""

    @abstractmethod
    def epoch(self) -> int:
        """The current epoch (0 before any coordinator started)."""

    @abstractmethod
    def first_batch(self, proposed: int) -> int:
        """The app's first batch: *proposed* on the first call ever, the stored one after."""

    @abstractmethod
    def log_batch(self, epoch: int, b: int, ranges: dict[str, OffsetRange]) -> None:
        """Record batch *b*'s input offset ranges; raises FencedError for an old epoch."""

    @abstractmethod
    def batches(self) -> dict[int, dict[str, OffsetRange]]:
        """Every logged batch not yet forgotten."""

    @abstractmethod
    def mark_done(self, epoch: int, b: int) -> None:
        """Every batch up to *b* completed (monotonic: a lower *b* changes nothing)."""

    @abstractmethod
    def done(self) -> int | None:
        """The highest batch up to which everything completed, or None."""

    @abstractmethod
    def forget_before(self, b: int) -> None:
        """Drop offset ranges of batches before *b* (lineage no longer needed)."""

    @abstractmethod
    def set_checkpoint(self, node: int, part: int, b: int) -> None:
        """State of (node, part) at batch *b* is fully written."""

    @abstractmethod
    def checkpoints(self) -> dict[tuple[int, int], int]:
        """Last complete checkpoint batch per (node, partition)."""


class MemoryMetaLog(MetaLog):
    """In-memory backend for unit tests and the in-process runner."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._first: int | None = None
        self._batches: dict[int, dict[str, OffsetRange]] = {}
        self._done: int | None = None
        self._ckpt: dict[tuple[int, int], int] = {}

    def bump_epoch(self) -> int:
        with self._lock:
            self._epoch += 1
            return self._epoch

    def epoch(self) -> int:
        return self._epoch

    def first_batch(self, proposed: int) -> int:
        with self._lock:
            if self._first is None:
                self._first = proposed
            return self._first

    def _fence(self, epoch: int) -> None:
        if epoch < self._epoch:
            msg = f"epoch {epoch} is fenced by epoch {self._epoch}"
            raise FencedError(msg)

    def log_batch(self, epoch: int, b: int, ranges: dict[str, OffsetRange]) -> None:
        with self._lock:
            self._fence(epoch)
            self._batches[b] = dict(ranges)

    def batches(self) -> dict[int, dict[str, OffsetRange]]:
        return dict(self._batches)

    def mark_done(self, epoch: int, b: int) -> None:
        with self._lock:
            self._fence(epoch)
            if self._done is None or b > self._done:
                self._done = b

    def done(self) -> int | None:
        return self._done

    def forget_before(self, b: int) -> None:
        with self._lock:
            for x in [x for x in self._batches if x < b]:
                del self._batches[x]

    def set_checkpoint(self, node: int, part: int, b: int) -> None:
        with self._lock:
            if b > self._ckpt.get((node, part), -1):
                self._ckpt[(node, part)] = b

    def checkpoints(self) -> dict[tuple[int, int], int]:
        return dict(self._ckpt)


# KEYS[1] = epoch key, KEYS[2] = target key; ARGV[1] = caller epoch, then the command
_FENCED_HSET = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < cur then
  return redis.error_reply('FENCED epoch ' .. ARGV[1] .. ' < ' .. cur)
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
_FENCED_MAX = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) < cur then
  return redis.error_reply('FENCED epoch ' .. ARGV[1] .. ' < ' .. cur)
end
local old = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[2]) > old then redis.call('SET', KEYS[2], ARGV[2]) end
return 1
"""
_MAX_HSET = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


class RedisMetaLog(MetaLog):
    """Redis backend; epoch checks run inside Lua scripts, atomically with the write."""

    def __init__(self, client: Any, app_id: str) -> None:
        self.r = client
        self.prefix = f"dstream:{app_id}:"
        self._hset = client.register_script(_FENCED_HSET)
        self._max = client.register_script(_FENCED_MAX)
        self._max_hset = client.register_script(_MAX_HSET)

    def key(self, name: str) -> str:
        return self.prefix + name

    def _call(self, script: Any, keys: list[str], args: list[Any]) -> None:
        import redis

        try:
            script(keys=keys, args=args)
        except redis.ResponseError as e:
            if "FENCED" in str(e):
                raise FencedError(str(e)) from e
            raise

    def bump_epoch(self) -> int:
        return int(self.r.incr(self.key("epoch")))

    def epoch(self) -> int:
        return int(self.r.get(self.key("epoch")) or 0)

    def first_batch(self, proposed: int) -> int:
        self.r.set(self.key("first"), proposed, nx=True)
        return int(self.r.get(self.key("first")))

    def log_batch(self, epoch: int, b: int, ranges: dict[str, OffsetRange]) -> None:
        data = pack({k: list(v) for k, v in ranges.items()})
        self._call(self._hset, [self.key("epoch"), self.key("batches")], [epoch, b, data])

    def batches(self) -> dict[int, dict[str, OffsetRange]]:
        raw = self.r.hgetall(self.key("batches"))
        return {
            int(k): {bid: tuple(v) for bid, v in unpack(data).items()}  # type: ignore[misc]
            for k, data in raw.items()
        }

    def mark_done(self, epoch: int, b: int) -> None:
        self._call(self._max, [self.key("epoch"), self.key("done")], [epoch, b])

    def done(self) -> int | None:
        v = self.r.get(self.key("done"))
        return None if v is None else int(v)

    def forget_before(self, b: int) -> None:
        old = [k for k in self.r.hkeys(self.key("batches")) if int(k) < b]
        if old:
            self.r.hdel(self.key("batches"), *old)

    def set_checkpoint(self, node: int, part: int, b: int) -> None:
        self._max_hset(keys=[self.key("checkpoints")], args=[f"{node}:{part}", b])

    def checkpoints(self) -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}
        for k, v in self.r.hgetall(self.key("checkpoints")).items():
            node, part = (k.decode() if isinstance(k, bytes) else k).split(":")
            out[(int(node), int(part))] = int(v)
        return out
