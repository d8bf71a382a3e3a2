"""Re-reading an input block from Kafka by its logged offset range.

Kafka is the durable log: when both copies of a block are lost, the block of batch ``b``
is rebuilt from ``[from, until)`` (``until`` exclusive) and is byte-identical to the sealed
one, because offsets are immutable and the block records exactly the data records in the
range (transaction markers have offsets but no record).
"""

from __future__ import annotations

import time
from typing import Any

from engine.codec import encode_input_block
from engine.errors import DStreamError

#: A range is at most one batch of records; 60 s bounds a re-read on a slow broker.
REREAD_TIMEOUT_S = 60.0


def read_range(
    config: dict[str, Any],
    topic: str,
    partition: int,
    start: int,
    until: int,
    with_meta: bool = False,
    timeout: float = REREAD_TIMEOUT_S,
) -> bytes:
    """The input block of ``topic[partition]`` offsets ``[start, until)``."""
    values: list[Any] = []
    offsets: list[int] = []
    keys: list[Any] = []
    stamps: list[int] = []
    if until > start:
        from confluent_kafka import Consumer, TopicPartition

        conf = dict(config)
        conf.update(
            {
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
            }
        )
        c = Consumer(conf)
        try:
            c.assign([TopicPartition(topic, partition, start)])
            deadline = time.monotonic() + timeout
            done = False
            while not done:
                if time.monotonic() > deadline:
                    msg = (
                        f"re-reading {topic}[{partition}] offsets [{start}, {until}) "
                        f"timed out after {timeout:.0f} s at {len(values)} records"
                    )
                    raise DStreamError(msg)
                for m in c.consume(10000, 0.2):
                    err = m.error()
                    if err is not None:
                        if err.code() == -191:  # partition EOF: nothing more exists
                            done = True
                        continue
                    off = int(m.offset() or 0)
                    if off >= until:
                        done = True
                        break
                    if off < start:
                        continue
                    values.append(m.value())
                    offsets.append(off)
                    if with_meta:
                        keys.append(m.key())
                        stamps.append(int(m.timestamp()[1]))
                    if off == until - 1:
                        done = True
                        break
                if not done:
                    pos = c.position([TopicPartition(topic, partition)])[0].offset
                    done = pos >= until
        finally:
            c.close()
    return encode_input_block(
        topic,
        partition,
        start,
        until,
        values,
        offsets,
        keys if with_meta else None,
        stamps if with_meta else None,
    )
