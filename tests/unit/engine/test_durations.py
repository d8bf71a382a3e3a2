"""Durations: one parser for the API, with one message for what it cannot read."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import StreamingContext
from engine.durations import FORMS, DurationError, to_seconds
from engine.errors import GraphError
from engine.testing import canonical, run_pipeline

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 30S ", 30.0),
        ("2", 2.0),
        (".25s", 0.25),
        ("-2s", -2.0),
        (3, 3.0),
        (0.5, 0.5),
        (timedelta(minutes=1, milliseconds=250), 60.25),
    ],
)
def test_accepted_forms(text: object, seconds: float) -> None:
    assert to_seconds(text, "x") == pytest.approx(seconds)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", ["1 sec", "s", "", "1d", "1s2", "--1s", "1e3s", True, None, math.nan, math.inf, [1]]
)
def test_anything_else_names_the_argument_and_the_forms(bad: object) -> None:
    with pytest.raises(DurationError) as ei:
        to_seconds(bad, "window")  # type: ignore[arg-type]
    assert str(ei.value) == f"window: cannot read {bad!r} as a duration; use {FORMS}"
    assert isinstance(ei.value, ValueError)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(UNITS)))
def test_text_is_number_times_unit(n: int, unit: str) -> None:
    assert to_seconds(f"{n}{unit}") == pytest.approx(n * UNITS[unit])


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_a_number_and_its_timedelta_agree(x: float) -> None:
    assert to_seconds(x) == x
    assert to_seconds(timedelta(seconds=x)) == pytest.approx(x, abs=1e-6)


def test_the_lecture_pipeline_reads_as_written() -> None:
    """``window("5s")`` on a ``"1s"`` context: the same result as in seconds."""

    def build(written: bool) -> object:
        def func(s: object) -> object:
            if written:
                return s.window("2s", "1s").count_by_value_and_window("4s", "2s")  # type: ignore[attr-defined]
            return s.window(2, 1).count_by_value_and_window(4, 2)  # type: ignore[attr-defined]

        return func

    batches = [["a", "b"], ["a"], ["c", "a"], [], ["b"], ["a"]]
    as_text = run_pipeline(batches, build(True), batch_interval="1s")  # type: ignore[arg-type]
    as_seconds = run_pipeline(batches, build(False), batch_interval=1.0)  # type: ignore[arg-type]
    assert [sorted(map(canonical, b)) for b in as_text] == [
        sorted(map(canonical, b)) for b in as_seconds
    ]
    assert any(as_text)


def test_durations_in_the_api_keep_their_checks() -> None:
    ssc = StreamingContext("500ms")
    assert ssc.batch_interval == 0.5
    s = ssc.queue_stream([[1]])
    with pytest.raises(GraphError, match=r"window=1.2s, batch=0.5s"):
        s.window("1200ms")
    with pytest.raises(DurationError, match=r"^window: slide: cannot read '1 sec'"):
        s.window("1s", "1 sec")
    with pytest.raises(GraphError, match="positive"):
        s.track(lambda k, e: e, lambda k, st, e: st, timeout="-1s")
    assert s.track(lambda k, e: e, lambda k, st, e: st, timeout="2s").node.args["timeout"] == 4
    with pytest.raises(GraphError, match=r"between 10ms and 1h, got '2h'"):
        StreamingContext("2h")
