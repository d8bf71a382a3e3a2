"""Bounded runs and catch-up (#15): bound parsing and the batch clock's pure decisions."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from engine import StreamingContext
from engine.bounds import Bound, parse_instant, parse_start, parse_stop
from engine.errors import GraphError
from ops.coordinator.bounded import (
    EMPTY_GAP_S,
    MAX_IN_FLIGHT,
    Pacer,
    decode_stops,
    encode_stops,
    is_behind,
    reached,
    source_bounds,
)
from state.metalog import MemoryMetaLog, OffsetRange

NOON = 1_796_040_000_000  # 2026-11-30T12:00:00Z in ms


# -- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "2026-11-30T12:00:00Z",
        "2026-11-30T12:00:00+00:00",
        "2026-11-30T13:00:00+01:00",
        "2026-11-30 12:00:00.000Z",
        dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC),
    ],
)
def test_instants_are_ms_since_the_epoch_in_utc(text: object) -> None:
    assert parse_instant(text) == NOON


@pytest.mark.parametrize("bad", ["2026-11-30T12:00:00", dt.datetime(2026, 11, 30), "noon", 5])
def test_an_instant_without_a_zone_or_not_a_time_is_refused(bad: object) -> None:
    with pytest.raises(GraphError, match=r"timezone|ISO 8601"):
        parse_instant(bad, "--until")


def test_stop_and_start_forms() -> None:
    assert parse_stop(None) is None
    assert parse_stop("end") == Bound("end")
    assert parse_stop("2026-11-30T12:00:00Z") == Bound("time", NOON)
    assert parse_start("earliest") == Bound("earliest")
    assert parse_start("latest") == Bound("latest")
    assert parse_start("2026-11-30T12:00:00Z") == Bound("time", NOON)
    assert Bound("time", NOON).describe() == "2026-11-30T12:00:00Z"
    with pytest.raises(GraphError, match="'end' or an ISO 8601"):
        parse_stop(3, "--until")
    with pytest.raises(GraphError, match="start must be"):
        parse_start(0)


def test_kafka_stream_keeps_its_bounds_and_checks_them() -> None:
    ssc = StreamingContext("1s")
    s = ssc.kafka_stream("pv", start="2026-11-30T12:00:00Z", stop="end")
    assert s._node.args["start_bound"] == Bound("time", NOON)
    assert s._node.args["stop_bound"] == Bound("end")
    assert ssc.kafka_stream("pv")._node.args["stop_bound"] is None
    with pytest.raises(GraphError, match="stop"):
        ssc.kafka_stream("pv", stop="tomorrow")


def test_until_bounds_every_kafka_source_and_wins_over_a_sources_stop() -> None:
    ssc = StreamingContext("1s")
    ssc.kafka_stream("a", stop="end")
    ssc.kafka_stream("b")
    ssc.queue_stream([[1]])
    nodes = ssc.nodes
    layout = {0: [("a", 0), ("a", 1)], 1: [("b", 0)], 2: [("", 0)]}
    own = source_bounds(nodes, layout, None)
    assert own == {(0, 0): ("a", 0, Bound("end")), (0, 1): ("a", 1, Bound("end"))}
    until = Bound("time", NOON)
    all_ = source_bounds(nodes, layout, until)
    assert set(all_) == {(0, 0), (0, 1), (1, 0)}
    assert {b for _t, _p, b in all_.values()} == {until}


def test_stop_offsets_are_fixed_once_per_run() -> None:
    log = MemoryMetaLog()
    first = {(0, 0): 100, (0, 1): 7}
    assert decode_stops(log.stop_offsets(encode_stops(first))) == first
    # a restarted leader proposes later end offsets: the run's first ones stay
    assert decode_stops(log.stop_offsets(encode_stops({(0, 0): 500, (0, 1): 9}))) == first
    log.clear_stop_offsets()  # the run finished: the next run has its own end
    assert decode_stops(log.stop_offsets(encode_stops({(0, 0): 500}))) == {(0, 0): 500}


# -- decisions -------------------------------------------------------------------------------
def test_reached_needs_every_partition_bounded_and_at_its_stop() -> None:
    keys = [(0, 0), (0, 1)]
    stops = {(0, 0): 10, (0, 1): 5}
    assert not reached({(0, 0): 10, (0, 1): 4}, stops, keys)
    assert reached({(0, 0): 10, (0, 1): 5}, stops, keys)
    assert reached({(0, 0): 12, (0, 1): 5}, stops, keys)  # a stop below the start
    assert not reached({(0, 0): 10, (0, 1): 5, (1, 0): 0}, stops, [*keys, (1, 0)])


def _ranges(*counts: int) -> dict[str, OffsetRange]:
    return {f"in/0/3/{i}": OffsetRange("pv", i, 0, n, n) for i, n in enumerate(counts)}


def test_behind_while_a_bounded_partition_is_short_of_its_stop() -> None:
    stops = {(0, 0): 10}
    assert is_behind(positions={(0, 0): 9}, stops=stops, last={}, cap=None, lag=0)
    assert not is_behind(positions={(0, 0): 10}, stops=stops, last={}, cap=None, lag=0)


def test_behind_when_the_last_batch_hit_the_cap_or_a_backlog_waits() -> None:
    pos = {(0, 0): 100}
    assert is_behind(positions=pos, stops={}, last=_ranges(500, 20), cap=500, lag=0)
    assert not is_behind(positions=pos, stops={}, last=_ranges(499, 20), cap=500, lag=0)
    # a steady stream: less waits than the last batch held -> follow the clock
    assert not is_behind(positions=pos, stops={}, last=_ranges(600, 400), cap=None, lag=300)
    assert is_behind(positions=pos, stops={}, last=_ranges(600, 400), cap=None, lag=5000)
    assert is_behind(positions=pos, stops={}, last={}, cap=None, lag=1)
    assert not is_behind(positions=pos, stops={}, last={}, cap=None, lag=0)
    # the last batch was empty: a lag reported before it is stale -> follow the clock
    assert not is_behind(positions=pos, stops={}, last=_ranges(0, 0), cap=None, lag=5000)


def test_batch_times_advance_by_the_interval_whatever_the_pace() -> None:
    p = Pacer(0.5, 1000.0)
    assert [p.time_ms(k) for k in range(4)] == [1_000_000, 1_000_500, 1_001_000, 1_001_500]
    # cut early (behind): the times stay
    assert p.wait(1, 1000.1, behind=True, in_flight=0, last_cut=1000.0, last_records=10) == 0.0
    assert p.time_ms(1) == 1_000_500


def test_keeping_up_follows_the_clock() -> None:
    p = Pacer(1.0, 1000.0)
    assert p.wait(0, 1000.0, behind=False, in_flight=0, last_cut=0.0, last_records=1) == 0.0
    assert p.wait(1, 1000.3, behind=False, in_flight=0, last_cut=1000.0, last_records=5) == (
        pytest.approx(0.7)
    )
    assert p.wait(1, 1001.0, behind=False, in_flight=1, last_cut=1000.0, last_records=5) == 0.0


def test_behind_cuts_as_soon_as_the_previous_batch_completed() -> None:
    p = Pacer(1.0, 1000.0)
    busy = MAX_IN_FLIGHT
    w = p.wait(1, 1000.2, behind=True, in_flight=busy, last_cut=1000.0, last_records=9)
    assert 0 < w <= 0.05  # re-checks soon (a completion wakes the clock at once)
    assert p.wait(1, 1000.2, behind=True, in_flight=0, last_cut=1000.0, last_records=9) == 0.0
    assert p.ahead == pytest.approx(0.8)
    # after an empty batch, an early cut waits a little (receivers still fetching)
    w = p.wait(2, 1000.21, behind=True, in_flight=0, last_cut=1000.2, last_records=0)
    assert 0 < w <= EMPTY_GAP_S
    assert p.wait(2, 1000.26, behind=True, in_flight=0, last_cut=1000.2, last_records=0) == 0.0


def test_with_one_batch_in_flight_the_next_is_cut_halfway_through_its_time() -> None:
    p = Pacer(1.0, 1000.0)
    kw: dict[str, Any] = {"behind": True, "in_flight": 1, "last_records": 9}
    # unknown duration (no batch completed yet): wait for the one in flight
    assert p.wait(1, 1000.3, last_cut=1000.0, last_took=0.0, **kw) > 0
    # the last batch took 0.4 s: the next is cut 0.2 s after the one in flight
    assert p.wait(1, 1000.1, last_cut=1000.0, last_took=0.4, **kw) > 0
    assert p.wait(1, 1000.2, last_cut=1000.0, last_took=0.4, **kw) == 0.0
    # never more than MAX_IN_FLIGHT at once
    kw["in_flight"] = MAX_IN_FLIGHT
    assert p.wait(2, 1000.9, last_cut=1000.2, last_took=0.4, **kw) > 0


def test_a_caught_up_app_then_cuts_one_batch_per_interval_of_wall_time() -> None:
    p = Pacer(1.0, 1000.0)
    now = 1000.0
    for k in range(1, 6):  # a backlog: five batches cut 0.1 s apart
        now += 0.1
        assert p.wait(k, now, behind=True, in_flight=0, last_cut=now - 0.1, last_records=9) == 0
    assert p.ahead == pytest.approx(5 - 0.5)
    # caught up at 1000.5: batch 6 (time 1006.0) is due one interval after the last cut
    assert p.wait(6, now, behind=False, in_flight=0, last_cut=now, last_records=9) == (
        pytest.approx(1.0)
    )
    assert p.time_ms(6) == 1_006_000


def test_a_bad_until_is_a_usage_error() -> None:
    import argparse

    from engine.errors import ConfigError
    from ops.cli_roles import until_of

    assert until_of(argparse.Namespace(until=None)) is None
    assert until_of(argparse.Namespace(until="end")) == Bound("end")
    with pytest.raises(ConfigError, match="no timezone"):
        until_of(argparse.Namespace(until="2026-11-30T12:00:00"))
