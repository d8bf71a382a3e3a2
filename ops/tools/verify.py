"""``dstream verify``: compare an app's committed Kafka output with a reference computation.

The output topic is read with ``read_committed`` (what a downstream consumer sees); the
reference is :class:`engine.reference.ReferenceRunner` run on the app's own graph over
every record of the input topic. Two kinds of output can be checked exactly without
knowing how the input was cut into batches:

* **changelog** — the output is a ``running_reduce`` (or its ``.snapshot()``), fed by
  narrow operators and at most a ``reduce_by_key`` with the same function. Its final
  state does not depend on the batch boundaries (the function is associative and
  commutative, as Spark requires), so the **last value per key** of the output, in batch
  order, must equal the reference over all input records as one batch. A key written
  twice in one batch is a duplicate (exactly-once broken) and reported as well.
* **records** — the output is a per-record function of the input (``map``, ``filter``,
  ``flat_map``, ``*_values``, ``union``, ``repartition``): the output messages, as a
  multiset, must equal the reference's.

Anything else (windows, joins, per-batch aggregates) depends on the batch boundaries and
is refused with a message saying so. Records that fail to decode are skipped, as the
engine dead-letters them.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.codec import MAX_BLOCK_BYTES, CodecError, unpack
from engine.errors import ConfigError
from engine.graph import Node, StreamingContext
from engine.reference import ReferenceRunner
from ops.sinks import encode_output

#: Operators that map each input record to output records independently of the others.
NARROW = frozenset({"map", "flat_map", "filter", "map_values", "flat_map_values", "union"})
NARROW_OR_SHUFFLE = NARROW | {"repartition"}
#: A partition counts as fully read after this long without a message: the broker answers
#: fetches within its ``fetch.wait.max.ms`` (500 ms by default), so 2 s is four empty polls.
IDLE_S = 2.0
#: Upper bound on reading one topic, so a stuck broker does not hang the command.
READ_TIMEOUT_S = 300.0
#: Relative tolerance for floats: a running sum of floats depends on the batch boundaries.
FLOAT_REL_TOL = 1e-9

Mode = Literal["changelog", "records"]


@dataclass(frozen=True)
class Difference:
    """One way the output differs from the reference.

    Attributes:
        kind: ``missing`` (in the reference, not in the output), ``extra`` (the opposite),
            ``wrong`` (both have the key, values differ) or ``duplicate`` (a key written
            more than once in one batch).
        key: the record key (JSON-decoded; lists become tuples), or None for unkeyed records.
        expected: the reference value (None when extra).
        actual: the output value (None when missing).
        count: how many times (records mode, or the duplicate count).

    """

    kind: Literal["missing", "extra", "wrong", "duplicate", "dead-letter"]
    key: Any
    expected: Any = None
    actual: Any = None
    count: int = 1
    batch: int | None = None

    def __str__(self) -> str:
        k = json.dumps(_thaw(self.key), default=repr)
        times = f" (x{self.count})" if self.count > 1 else ""
        if self.kind == "missing":
            return f"missing  key {k}: expected {_show(self.expected)}, not in the output{times}"
        if self.kind == "extra":
            return f"extra    key {k}: {_show(self.actual)} is not in the reference{times}"
        if self.kind == "duplicate":
            return f"duplicate key {k}: written {self.count} times in batch {self.batch}"
        if self.kind == "dead-letter":
            return f"dead letter {k}: {self.actual}"
        return f"wrong    key {k}: expected {_show(self.expected)}, got {_show(self.actual)}"


@dataclass(frozen=True)
class DeadLetterReport:
    """What the dead-letter topic holds (read_committed).

    Attributes:
        topic: the dead-letter topic read.
        total: dead letters in it.
        by_reason: per reason (``decode``, ``user``, ``encode``).
        from_input: letters of records of the checked input topic (decode and user ones).
        decode: decode letters of the checked input topic.
        encode: encode letters of the checked output topic.

    """

    topic: str
    total: int
    by_reason: dict[str, int]
    from_input: int
    decode: int
    encode: int

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items()))
        return f"{self.total} dead letters in {self.topic}" + (f" ({reasons})" if reasons else "")


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found. ``ok`` when there is no difference."""

    mode: Mode
    input_topic: str
    output_topic: str
    input_records: int
    skipped_records: int
    output_messages: int
    keys: int
    differences: list[Difference] = field(default_factory=list)
    dead: DeadLetterReport | None = None

    @property
    def ok(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.differences)} difference(s)"
        skipped = f" ({self.skipped_records} undecodable, skipped)" if self.skipped_records else ""
        what = "keys (last value each)" if self.mode == "changelog" else "distinct records"
        dead = f"; {self.dead.summary()}" if self.dead is not None else ""
        return (
            f"verify {verdict}: {self.output_messages} committed messages in "
            f"{self.output_topic} against the reference over {self.input_records} records of "
            f"{self.input_topic}{skipped}; {self.keys} {what} compared ({self.mode} mode)"
            f"{dead}"
        )


@dataclass(frozen=True)
class OutputPlan:
    """The app's nodes verify works on: its Kafka source and the checked Kafka output."""

    source: Node
    output: Node
    mode: Mode


def plan_for(ssc: StreamingContext, output_topic: str | None) -> OutputPlan:
    """Pick the source and output to check, and the comparison mode.

    Raises:
        ConfigError: the app has no or several Kafka sources, no matching ``to_kafka``
            output, or an output whose result depends on batch boundaries.

    """
    sources = [n for n in ssc.nodes if n.kind == "source" and n.args["source"] == "kafka"]
    if len(sources) != 1:
        msg = (
            f"verify needs an app with exactly one kafka_stream source, this one has {len(sources)}"
        )
        raise ConfigError(msg)
    outs = [n for n in ssc.nodes if n.kind == "output" and n.args["sink"] == "kafka"]
    if output_topic is not None and len(outs) > 1:
        outs = [n for n in outs if n.args["topic"] == output_topic]
    if len(outs) != 1:
        topics = [
            n.args["topic"] for n in ssc.nodes if n.kind == "output" and n.args["sink"] == "kafka"
        ]
        msg = (
            f"verify needs one to_kafka output to check; the app writes {topics or 'none'}: "
            "pass --output with one of them"
        )
        raise ConfigError(msg)
    out = outs[0]
    return OutputPlan(sources[0], out, _mode(out.parents[0]))


def _mode(n: Node) -> Mode:
    if n.kind == "snapshot":
        n = n.parents[0]
    if n.kind == "state" and n.args["mode"] == "running_reduce":
        fn = n.args["fn"]
        for a in _ancestors(n.parents[0]):
            if a.kind in NARROW_OR_SHUFFLE or a.kind == "source":
                continue
            if a.kind == "reduce_by_key" and a.args["fn"] is fn:
                continue
            msg = (
                f"verify: running_reduce {n.name or n} is fed by {a.kind} {a.name or a}, whose "
                "result depends on batch boundaries; verify supports narrow operators and a "
                "reduce_by_key with the running_reduce's own function before it"
            )
            raise ConfigError(msg)
        return "changelog"
    bad = [a for a in _ancestors(n) if a.kind not in NARROW_OR_SHUFFLE and a.kind != "source"]
    if bad:
        msg = (
            f"verify: the output depends on batch boundaries through {bad[0].kind} "
            f"{bad[0].name or bad[0]}; verify checks running_reduce changelogs and per-record "
            "(map/filter/flat_map) outputs"
        )
        raise ConfigError(msg)
    return "records"


def _ancestors(n: Node) -> Iterable[Node]:
    seen: set[int] = set()
    stack = [n]
    while stack:
        x = stack.pop()
        if x.id in seen:
            continue
        seen.add(x.id)
        yield x
        stack.extend(x.parents)


# -- reading -------------------------------------------------------------------------------
def read_topic(conf: dict[str, Any], topic: str, *, idle_s: float = IDLE_S) -> list[Any]:
    """Every committed message of *topic* (``read_committed``), from the earliest offset.

    Reads until each partition's position reaches the high watermark taken at the start,
    or nothing arrived for *idle_s* (an open transaction holds ``read_committed`` back at
    its first offset; its messages are not committed output yet).

    Raises:
        ConfigError: the topic does not exist.

    """
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            **conf,
            "group.id": f"dstream-verify-{time.time_ns()}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        md = c.list_topics(topic, timeout=30).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            msg = f"topic {topic} does not exist (or has no partitions)"
            raise ConfigError(msg)
        tps = [TopicPartition(topic, p, 0) for p in sorted(md.partitions)]
        ends = {tp.partition: c.get_watermark_offsets(tp, timeout=30)[1] for tp in tps}
        c.assign(tps)
        out: list[Any] = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            msgs = c.consume(10_000, 0.2)
            if msgs:
                idle_since = time.monotonic()
                out.extend(m for m in msgs if m.error() is None)
            positions = c.position(tps)
            if all(p.offset >= ends[p.partition] for p in positions):
                break
            if time.monotonic() - idle_since > idle_s:
                break
        return out
    finally:
        c.close()


def decode_input(source: Node, messages: Iterable[Any]) -> tuple[list[Any], int]:
    """The records the source would yield, and how many failed to decode (skipped)."""
    fmt = source.args["value_format"]
    loads: Callable[[bytes], Any]
    if fmt == "json":
        loads = json.loads
    elif fmt == "msgpack":
        loads = _unpack
    else:
        loads = bytes
    records: list[Any] = []
    skipped = 0
    for m in messages:
        try:
            value = loads(m.value())
        except (ValueError, TypeError, CodecError):
            skipped += 1
            continue
        if source.args.get("with_metadata"):
            stamp_type, stamp = m.timestamp()
            value = {
                "key": m.key(),
                "value": value,
                "topic": m.topic(),
                "partition": m.partition(),
                "offset": m.offset(),
                "timestamp": stamp if stamp_type else None,
            }
        records.append(value)
    return records, skipped


def _unpack(v: bytes) -> Any:
    return unpack(v, max_bytes=max(len(v), MAX_BLOCK_BYTES))


# -- comparing -----------------------------------------------------------------------------
def reference_records(
    ssc: StreamingContext, plan: OutputPlan, records: list[Any]
) -> tuple[list[Any], int | None]:
    """The reference run over *records* as one batch: its output records and user letters.

    The second item counts the records a user function raised on, as the fleet
    dead-letters them; None when a ``transform`` raised (it dead-letters a whole batch, so
    the count depends on how the fleet cut the input into batches).
    """
    runner = ReferenceRunner(ssc, inputs={plan.source.id: [records]})
    try:
        runner.run(1)
    except Exception as e:
        msg = (
            f"the reference cannot evaluate the app: {type(e).__name__}: {e} (a reduce, "
            "window or state function raised; verify checks only apps whose functions "
            "raise record by record)"
        )
        raise ConfigError(msg) from e
    out = [r for _b, batch in runner.outputs[plan.output.id] for r in batch]
    by_record = all(not op.startswith("transform") for _, op, _, _ in runner.dead_letters)
    return out, len(runner.dead_letters) if by_record else None


def _decoder(fmt: str) -> Callable[[bytes | None], Any]:
    def dec(b: bytes | None) -> Any:
        if b is None:
            return None
        return _freeze(_unpack(b) if fmt == "msgpack" else json.loads(b))

    return dec


def _freeze(x: Any) -> Any:
    """Hashable form of a decoded JSON/msgpack value (lists -> tuples, dicts -> items)."""
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, dict):
        return (
            "__dict__",
            tuple(sorted(((_freeze(k), _freeze(v)) for k, v in x.items()), key=repr)),
        )
    return x


def _thaw(x: Any) -> Any:
    if isinstance(x, tuple):
        if len(x) == 2 and x[0] == "__dict__":
            return {
                json.dumps(_thaw(k)) if not isinstance(k, str) else k: _thaw(v) for k, v in x[1]
            }
        return [_thaw(v) for v in x]
    return x


def _show(x: Any) -> str:
    return json.dumps(_thaw(x), default=repr)


def same_value(a: Any, b: Any) -> bool:
    """Equal, with floats compared to a relative tolerance (sums depend on the order)."""
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, int | float) and isinstance(b, int | float):
            return math.isclose(a, b, rel_tol=FLOAT_REL_TOL, abs_tol=1e-12)
        return False
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _batch_of(m: Any) -> int:
    """Batch order of an output message: ``dstream-batch-seq`` else ``dstream-batch``."""
    headers = dict(m.headers() or [])
    for name in ("dstream-batch-seq", "dstream-batch"):
        if name in headers:
            try:
                return int(headers[name])
            except (TypeError, ValueError):
                break
    return 2**63 - 1  # not written by the fleet: ordered last, so it cannot hide


def compare_changelog(
    expected: Iterable[tuple[bytes | None, bytes]], messages: list[Any], fmt: str
) -> tuple[list[Difference], int]:
    """Differences between the reference's final state and the output's last values."""
    dec = _decoder(fmt)
    want = {dec(k): dec(v) for k, v in expected}
    got: dict[Any, Any] = {}
    per_batch: Counter[tuple[int, Any]] = Counter()
    for m in sorted(messages, key=lambda m: (_batch_of(m), m.partition(), m.offset())):
        key = dec(m.key())
        got[key] = dec(m.value())
        per_batch[(_batch_of(m), key)] += 1
    diffs: list[Difference] = []
    for key in sorted(set(want) | set(got), key=repr):
        if key not in got:
            diffs.append(Difference("missing", key, expected=want[key]))
        elif key not in want:
            diffs.append(Difference("extra", key, actual=got[key]))
        elif not same_value(want[key], got[key]):
            diffs.append(Difference("wrong", key, expected=want[key], actual=got[key]))
    for (batch, key), n in sorted(per_batch.items(), key=repr):
        if n > 1:
            diffs.append(Difference("duplicate", key, count=n, batch=batch))
    return diffs, len(want | got)


def compare_records(
    expected: Iterable[tuple[bytes | None, bytes]], messages: list[Any], fmt: str
) -> tuple[list[Difference], int]:
    """Differences between the reference's and the output's records, as multisets."""
    dec = _decoder(fmt)
    want = Counter((dec(k), dec(v)) for k, v in expected)
    got = Counter((dec(m.key()), dec(m.value())) for m in messages)
    diffs = [
        Difference("missing", k, expected=v, count=n)
        for (k, v), n in sorted((want - got).items(), key=repr)
    ]
    diffs += [
        Difference("extra", k, actual=v, count=n)
        for (k, v), n in sorted((got - want).items(), key=repr)
    ]
    return diffs, len(set(want) | set(got))


def _one_to_one(plan: OutputPlan) -> bool:
    """Whether each input record gives exactly one output record (map chains only)."""
    n = plan.output.parents[0]
    while n is not plan.source:
        if n.kind not in ("map", "map_values", "repartition") or len(n.parents) != 1:
            return False
        n = n.parents[0]
    return True


def check_dead_letters(
    messages: list[Any], input_topic: str, output_topic: str
) -> tuple[DeadLetterReport, list[Difference]]:
    """Count the dead letters, and report any source record dead-lettered twice."""
    by_reason: Counter[str] = Counter()
    seen: Counter[tuple[str, int, int, str]] = Counter()
    from_input = decode = encode = 0
    for m in messages:
        h = {k: v.decode(errors="replace") for k, v in (m.headers() or [])}
        op = h.get("dstream-operator", "")
        reason = (
            "decode" if op.endswith(".decode") else "encode" if op.endswith(".encode") else "user"
        )
        by_reason[reason] += 1
        topic = h.get("dstream-source-topic", "")
        offset = int(h.get("dstream-source-offset", "-1"))
        if reason == "encode":
            encode += topic == output_topic
            continue
        if topic == input_topic:
            from_input += 1
            decode += reason == "decode"
        if offset >= 0:
            seen[(topic, int(h.get("dstream-source-partition", "-1")), offset, op)] += 1
    diffs = [
        Difference(
            "dead-letter",
            key,
            actual=f"dead-lettered {n} times (exactly once expected)",
            count=n,
        )
        for key, n in sorted(seen.items())
        if n > 1
    ]
    report = DeadLetterReport("", len(messages), dict(by_reason), from_input, decode, encode)
    return report, diffs


def verify(
    ssc: StreamingContext,
    kafka_conf: dict[str, Any],
    *,
    input_topic: str | None = None,
    output_topic: str | None = None,
    dead_letter_topic: str | None = None,
) -> VerifyResult:
    """Read both topics and compare the output with the reference (see the module doc).

    *input_topic* and *output_topic* default to the app's own ``kafka_stream`` topic (when
    it reads one) and ``to_kafka`` topic. With *dead_letter_topic* (when it exists) the
    dead letters are counted and checked too: no source record dead-lettered twice, as
    many decode letters as undecodable input records, and - when each input record gives
    exactly one output record (a chain of ``map``) - records in = records out +
    dead-lettered.
    """
    plan = plan_for(ssc, output_topic)
    if input_topic is None:
        topics = plan.source.args["topics"]
        if len(topics) != 1:
            msg = f"the app reads {list(topics)}: pass --input"
            raise ConfigError(msg)
        input_topic = topics[0]
    output_topic = output_topic or plan.output.args["topic"]
    records, skipped = decode_input(plan.source, read_topic(kafka_conf, input_topic))
    messages = read_topic(kafka_conf, output_topic)
    fmt = plan.output.args["format"]
    expected = []
    ref_out, user_letters = reference_records(ssc, plan, records)
    for r in ref_out:
        try:
            expected.append(encode_output(r, fmt))
        except (TypeError, ValueError, OverflowError):
            continue  # the fleet dead-letters it (an encode dead letter)
    compare = compare_changelog if plan.mode == "changelog" else compare_records
    diffs, keys = compare(expected, messages, fmt)
    dead = None
    if dead_letter_topic:
        try:
            letters = read_topic(kafka_conf, dead_letter_topic)
        except ConfigError:
            letters = None  # no dead-letter topic: nothing was dead-lettered
        if letters is not None:
            found, dups = check_dead_letters(letters, input_topic, output_topic)
            dead = DeadLetterReport(
                dead_letter_topic,
                found.total,
                found.by_reason,
                found.from_input,
                found.decode,
                found.encode,
            )
            diffs += dups
            if found.decode != skipped:
                diffs.append(
                    Difference(
                        "dead-letter",
                        "decode",
                        expected=skipped,
                        actual=f"{found.decode} decode letters for {skipped} undecodable records",
                    )
                )
            found_user = found.by_reason.get("user", 0)
            if user_letters is not None and found_user != user_letters:
                diffs.append(
                    Difference(
                        "dead-letter",
                        "user",
                        expected=user_letters,
                        actual=(
                            f"{found_user} user-function letters; the reference dead-letters "
                            f"{user_letters} records"
                        ),
                    )
                )
            total_in = len(records) + skipped
            accounted = len(messages) + found.from_input + found.encode
            if plan.mode == "records" and _one_to_one(plan) and total_in != accounted:
                diffs.append(
                    Difference(
                        "dead-letter",
                        "accounting",
                        expected=total_in,
                        actual=(
                            f"records in {total_in} != records out {len(messages)} + "
                            f"dead-lettered {found.from_input + found.encode}"
                        ),
                    )
                )
    return VerifyResult(
        plan.mode,
        input_topic,
        output_topic,
        len(records),
        skipped,
        len(messages),
        keys,
        diffs,
        dead,
    )
