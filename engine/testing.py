"""The test kit: run a pipeline over input batches in-process, and a reference to compare.

Example (Spark's ``_test_func`` style)::

    from engine.testing import run_pipeline, run_reference, assert_batches_equal

    batches = [["a b", "b"], ["c"]]
    def words(s):
        return s.flat_map(str.split).map(lambda w: (w, 1)).reduce_by_key(operator.add)

    assert_batches_equal(run_pipeline(batches, words), [[("a", 1), ("b", 2)], [("c", 1)]])
    assert_batches_equal(run_pipeline(batches, words), run_reference(batches, words))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from engine.durations import Duration
from engine.graph import DStream, StreamingContext
from engine.local import LocalRunner
from engine.reference import ReferenceRunner
from engine.sinks import LocalSinks

Pipeline = Callable[..., DStream]


def _build(
    inputs: Sequence[Sequence[Sequence[Any]]],
    func: Pipeline,
    batch_interval: Duration,
    num_partitions: int,
) -> tuple[StreamingContext, list[tuple[int, list[Any]]]]:
    ssc = StreamingContext(batch_interval, num_partitions=num_partitions)
    streams = [ssc.queue_stream(batches) for batches in inputs]
    collected: list[tuple[int, list[Any]]] = []
    out = func(*streams)
    out.foreach_batch(lambda t, recs: collected.append((t, list(recs))))
    return ssc, collected


def run_pipeline(
    batches: Sequence[Sequence[Any]],
    func: Pipeline,
    *more_inputs: Sequence[Sequence[Any]],
    num_batches: int | None = None,
    batch_interval: Duration = 1.0,
    num_partitions: int = 2,
    fail_on_error: bool = False,
    sinks: LocalSinks | None = None,
) -> list[list[Any]]:
    """Run ``func(stream, *more_streams)`` on the engine, in-process.

    Returns the output records of every batch in which the output stream has data (a
    windowed stream only at slide ends), as lists.
    """
    inputs = [batches, *more_inputs]
    ssc, collected = _build(inputs, func, batch_interval, num_partitions)
    runner = LocalRunner(ssc, sinks=sinks, fail_on_error=fail_on_error)
    runner.run(num_batches if num_batches is not None else max(len(i) for i in inputs))
    return [recs for _, recs in collected]


def run_reference(
    batches: Sequence[Sequence[Any]],
    func: Pipeline,
    *more_inputs: Sequence[Sequence[Any]],
    num_batches: int | None = None,
    batch_interval: Duration = 1.0,
) -> list[list[Any]]:
    """The same as :func:`run_pipeline`, computed by the plain-Python reference."""
    inputs = [batches, *more_inputs]
    ssc, _ = _build(inputs, func, batch_interval, 1)
    ref = ReferenceRunner(ssc)
    ref.run(num_batches if num_batches is not None else max(len(i) for i in inputs))
    (out_id,) = ref.outputs
    return [recs for _, recs in ref.outputs[out_id]]


def canonical(value: Any) -> Any:
    """A comparable form: sequences become tuples, dicts sorted item tuples."""
    if isinstance(value, list | tuple):
        return tuple(canonical(v) for v in value)
    if isinstance(value, dict):
        return ("__dict__", tuple(sorted((repr(k), canonical(v)) for k, v in value.items())))
    return value


def assert_batches_equal(
    actual: Sequence[Sequence[Any]], expected: Sequence[Sequence[Any]], ordered: bool = False
) -> None:
    """Assert per-batch equality; within a batch, order is ignored unless *ordered*.

    Lists and tuples compare equal (records crossing a shuffle come back as tuples).
    """
    assert len(actual) == len(expected), (
        f"{len(actual)} output batches, expected {len(expected)}:\n"
        f"actual={actual!r}\nexpected={expected!r}"
    )
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        ca = [canonical(x) for x in a]
        ce = [canonical(x) for x in e]
        if ordered:
            assert ca == ce, f"batch {i}: {a!r} != expected {e!r}"
        else:
            assert Counter(map(repr, ca)) == Counter(map(repr, ce)), (
                f"batch {i}: {sorted(a, key=repr)!r} != expected {sorted(e, key=repr)!r}"
            )


__all__ = ["assert_batches_equal", "canonical", "run_pipeline", "run_reference"]
