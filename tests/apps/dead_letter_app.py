"""Dead-letter app: Kafka JSON records ``{"k": str, "n": int}`` -> running (sum, count) per k.

``parse`` raises on every ``n`` divisible by ``POISON_EVERY`` (and on any record that is not
such a dict); undecodable JSON is dead-lettered by the source. Topics come from
``DL_INPUT`` and ``DL_OUTPUT``; dead letters go to ``DSTREAM_DEAD_LETTER_TOPIC``.

Run it: ``DL_INPUT=in DL_OUTPUT=out dstream run tests/apps/dead_letter_app.py``.
"""

from __future__ import annotations

import os
from typing import Any

from engine import StreamingContext

POISON_EVERY = 5


def parse(event: Any) -> tuple[str, tuple[int, int]]:
    """``(k, (n, 1))``; raises ValueError on a poison ``n``."""
    n = event["n"]
    if n % POISON_EVERY == 0:
        msg = f"poison record n={n}"
        raise ValueError(msg)
    return event["k"], (n, 1)


def add_pairs(a: Any, b: Any) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def build(ssc: StreamingContext) -> None:
    records = ssc.kafka_stream(os.environ["DL_INPUT"], value_format="json")
    totals = records.map(parse).reduce_by_key(add_pairs).running_reduce(add_pairs)
    totals.to_kafka(os.environ["DL_OUTPUT"])
