"""Exact dead letters app: Kafka JSON ``{"k": str, "n": int}`` -> ``(k, n)`` records.

``classify`` raises on every ``n`` divisible by ``POISON_EVERY`` (a user-function dead
letter) and emits a ``complex`` value, which JSON cannot encode, for ``n % COMPLEX_EVERY ==
1`` (an encode dead letter of the output); with ``DLX_ALWAYS_RAISE=1`` it raises on every
record, and the (empty) result is summed per key, so the map is a stage of its own.
Undecodable input is dead-lettered by the source. Topics come from ``DLX_INPUT``
and ``DLX_OUTPUT``; dead letters go to ``DSTREAM_DEAD_LETTER_TOPIC``.

Run it: ``DLX_INPUT=in DLX_OUTPUT=out dstream run tests/apps/dead_letter_exact_app.py``.
"""

from __future__ import annotations

import operator
import os
from typing import Any

from engine import StreamingContext

POISON_EVERY = 7
COMPLEX_EVERY = 11


def classify(event: Any) -> tuple[str, Any]:
    """``(k, n)``; raises on poison ``n``, a complex value for some others."""
    n = event["n"]
    if os.environ.get("DLX_ALWAYS_RAISE") == "1" or n % POISON_EVERY == 0:
        msg = f"poison record n={n}"
        raise ValueError(msg)
    if n % COMPLEX_EVERY == 1:
        return event["k"], complex(n, 1)
    return event["k"], n


def build(ssc: StreamingContext) -> None:
    records = ssc.kafka_stream(os.environ["DLX_INPUT"], value_format="json")
    mapped = records.map(classify)
    if os.environ.get("DLX_ALWAYS_RAISE") == "1":
        # a shuffle after the raising map: the map runs as a stage of its own, one task
        # per input partition, which the scheduler may speculate (output tasks it does not)
        mapped = mapped.reduce_by_key(operator.add)
    mapped.to_kafka(os.environ["DLX_OUTPUT"])
