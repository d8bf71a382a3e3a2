"""Serialization of blocks and records: msgpack, with size limits, never pickle.

Every block that crosses a boundary (shuffle, persisted partition, replica, checkpoint) is a
msgpack round trip, in-process and on the fleet alike, so results do not depend on where a
task ran. Sequences come back as tuples (``use_list=False``), so ``(key, value)`` pairs stay
pairs.

Public: receivers (``ingest``) encode input blocks with :func:`encode_input_block`; the
worker block store, the metadata log and the checkpoint store (``state``) and the worker,
sinks and ``verify`` (``ops``) use :func:`pack` and :func:`unpack`: a block written by one
process is read by any other. Anything it cannot decode raises :class:`CodecError`.
"""

from __future__ import annotations

import zlib
from typing import Any

import msgpack

from engine.errors import DStreamError

#: Largest single block or frame accepted when unpacking (bounds memory on bad input).
MAX_BLOCK_BYTES = 256 * 1024 * 1024


class CodecError(DStreamError):
    """A value could not be serialized or a payload could not be deserialized."""


def pack(obj: Any) -> bytes:
    """Serialize *obj* (None, bool, int, float, str, bytes, lists, tuples, dicts)."""
    try:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as e:
        msg = (
            f"records crossing a shuffle, window, state or replica must be msgpack "
            f"serializable (None, bool, int, float, str, bytes, lists, tuples, dicts): {e}"
        )
        raise CodecError(msg) from e


def unpack(data: bytes | memoryview, max_bytes: int = MAX_BLOCK_BYTES) -> Any:
    """Deserialize msgpack *data*; sequences become tuples; sizes bounded by *max_bytes*."""
    if len(data) > max_bytes:
        msg = f"payload of {len(data)} bytes exceeds the limit of {max_bytes} bytes"
        raise CodecError(msg)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=False,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        msg = f"cannot decode msgpack payload of {len(data)} bytes: {e}"
        raise CodecError(msg) from e


def normalize(value: Any) -> Any:
    """The value as it would come back from a msgpack round trip (scalars unchanged)."""
    if type(value) in _SCALARS:
        return value
    return unpack(pack(value))


_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})


def stable_hash(key: Any) -> int:
    """A hash of *key* that is the same in every process and run (never Python's ``hash``).

    Strings hash their UTF-8 bytes, everything else its msgpack form (so ``1`` and ``1.0``
    may land in different partitions, as they serialize differently).
    """
    if type(key) is str:
        return zlib.crc32(key.encode())
    if type(key) is bytes:
        return zlib.crc32(key)
    return zlib.crc32(pack(key))


def encode_input_block(
    topic: str,
    partition: int,
    from_offset: int,
    until_offset: int,
    values: list[Any],
    offsets: list[int] | None = None,
    keys: list[Any] | None = None,
    timestamps: list[int] | None = None,
) -> bytes:
    """An input block: the records of one source partition in one batch.

    ``values`` are raw Kafka values (bytes, decoded by the first task that reads the block)
    or, for ``queue_stream``, the records themselves. ``[from_offset, until_offset)`` is the
    Kafka offset range (``until`` exclusive); re-reading it yields the same block bytes.
    """
    return pack([topic, partition, from_offset, until_offset, values, offsets, keys, timestamps])


def input_block_range(block: bytes | bytearray) -> tuple[int, int]:
    """The ``[from, until)`` offset range of an input block, read without decoding records."""
    try:
        u = msgpack.Unpacker(raw=False, max_buffer_size=max(len(block), 1))
        u.feed(block)
        if u.read_array_header() < 4:
            short = "short header"
            raise ValueError(short)
        u.skip()  # topic
        u.skip()  # partition
        return int(u.unpack()), int(u.unpack())
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        msg = f"not an input block ({len(block)} bytes): {e}"
        raise CodecError(msg) from e


def input_block_header(block: bytes) -> tuple[str, int, int, int, int]:
    """(topic, partition, from, until, record count) of an input block."""
    topic, partition, lo, hi, values, *_ = unpack(block)
    return topic, partition, lo, hi, len(values)
