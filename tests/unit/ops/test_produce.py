"""Unit tests of the producer harness: events, pacing on a fake clock, argument checks."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, ClassVar

import msgpack
import pytest

from engine.errors import ConfigError, DStreamError
from ops.cli import build_parser
from ops.tools.produce import (
    DEFAULT_BOOTSTRAP,
    Pacer,
    encode_event,
    pageview_events,
    produce_pageviews,
    resolve_bootstrap,
    run_paced,
    validate_args,
    zipf_cumulative_weights,
)

pytestmark = pytest.mark.unit


def fixed_clock() -> int:
    return 1_700_000_000_000


# --------------------------------------------------------------------------- events


def test_same_seed_gives_same_events() -> None:
    a = list(pageview_events(2_000, 50, "zipf", seed=7, clock_ms=fixed_clock))
    b = list(pageview_events(2_000, 50, "zipf", seed=7, clock_ms=fixed_clock))
    assert a == b


def test_different_seed_gives_different_events() -> None:
    a = [e["url"] for e in pageview_events(500, 50, "uniform", seed=1)]
    b = [e["url"] for e in pageview_events(500, 50, "uniform", seed=2)]
    assert a != b


def test_event_shape() -> None:
    (ev,) = pageview_events(1, 10, "uniform", seed=0, clock_ms=fixed_clock)
    assert set(ev) == {"url", "user", "ts", "seq"}
    assert ev["url"].startswith("/page/")
    assert 0 <= int(ev["url"].removeprefix("/page/")) < 10
    assert ev["user"].startswith("u")
    assert int(ev["user"][1:]) >= 0
    assert ev["ts"] == fixed_clock()
    assert ev["seq"] == 0


def test_wall_clock_ts_by_default() -> None:
    import time

    before = time.time_ns() // 1_000_000
    (ev,) = pageview_events(1, 10, "uniform", seed=0)
    after = time.time_ns() // 1_000_000
    assert before <= ev["ts"] <= after


@pytest.mark.parametrize("dist", ["uniform", "zipf"])
def test_per_key_seq_is_contiguous_from_zero(dist: str) -> None:
    seen: dict[str, list[int]] = {}
    for ev in pageview_events(5_000, 37, dist, seed=3):
        seen.setdefault(ev["url"], []).append(ev["seq"])
    assert seen
    for seqs in seen.values():
        assert seqs == list(range(len(seqs)))


def test_endless_stream_when_n_is_none() -> None:
    gen = pageview_events(None, 5, "uniform", seed=0)
    assert len([next(gen) for _ in range(10_000)]) == 10_000


def test_zipf_weights_are_cumulative_and_decreasing() -> None:
    cum = zipf_cumulative_weights(4, 1.0)
    assert cum == pytest.approx([1.0, 1.5, 1.5 + 1 / 3, 1.5 + 1 / 3 + 0.25])


def test_zipf_skews_towards_the_top_key() -> None:
    n, keys = 20_000, 100
    uni = Counter(e["url"] for e in pageview_events(n, keys, "uniform", seed=5))
    zipf = Counter(e["url"] for e in pageview_events(n, keys, "zipf", seed=5, zipf_s=1.1))
    top_url, top = zipf.most_common(1)[0]
    assert top_url == "/page/0"
    # Expected share of rank 1 at s=1.1 over 100 keys is about 23%; uniform is 1%.
    assert top > 10 * uni.most_common(1)[0][1]
    assert top / n == pytest.approx(1 / sum(1 / k**1.1 for k in range(1, keys + 1)), rel=0.1)
    # Every key stays reachable under uniform.
    assert len(uni) == keys


def test_uniform_is_roughly_flat() -> None:
    counts = Counter(e["url"] for e in pageview_events(50_000, 10, "uniform", seed=9))
    assert max(counts.values()) / min(counts.values()) < 1.15


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="keys"):
        pageview_events(1, 0, "uniform")
    with pytest.raises(ConfigError, match="distribution"):
        pageview_events(1, 3, "pareto")
    with pytest.raises(ConfigError, match="zipf skew"):
        pageview_events(1, 3, "zipf", zipf_s=0)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_encode_round_trips(fmt: str) -> None:
    (ev,) = pageview_events(1, 10, "uniform", seed=0, clock_ms=fixed_clock)
    raw = encode_event(ev, fmt)
    back = json.loads(raw) if fmt == "json" else msgpack.unpackb(raw, raw=False)
    assert back == ev


# --------------------------------------------------------------------------- pacing


class FakeClock:
    """A clock that only moves when the code under test sleeps (or a test advances it)."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s > 0
        self.sleeps.append(s)
        self.now += s


def test_pacer_schedule() -> None:
    p = Pacer(rate=1000.0, start=10.0)
    assert p.due(9.999) == 0
    assert p.due(10.0) == 1  # record 0 is due at start
    assert p.due(10.0049) == 5
    assert p.due(11.0) == 1001
    assert p.take(10.0049, sent=2) == 3
    assert p.take(10.0049, sent=10) == 0


def test_pacer_wakes_every_slice_when_records_are_continuously_due() -> None:
    p = Pacer(rate=20_000.0, start=0.0, slice_s=0.005)
    assert p.next_wake(1.0, sent=20_001) == pytest.approx(1.005)


def test_pacer_sleeps_until_next_record_at_low_rates() -> None:
    p = Pacer(rate=10.0, start=0.0, slice_s=0.005)
    assert p.next_wake(0.0, sent=1) == pytest.approx(0.1)


def test_pacer_forgives_backlog_beyond_max_lag() -> None:
    p = Pacer(rate=1000.0, start=0.0, max_lag_s=1.0)
    # 5 s stall with nothing sent: only one second of schedule is caught up.
    assert p.take(5.0, sent=0) == 1000
    assert p.take(5.0, sent=1000) == 0
    assert p.take(5.5, sent=1000) == 500


def test_unpaced_pacer_hands_out_chunks_without_sleeping() -> None:
    p = Pacer(rate=0.0, start=0.0, chunk=123)
    assert p.take(50.0, sent=10**9) == 123
    assert p.next_wake(3.0, sent=5) == 3.0


def test_run_paced_holds_rate_over_duration() -> None:
    clock = FakeClock()
    batches: list[int] = []

    def emit(n: int) -> int:
        batches.append(n)
        return n

    run = run_paced(emit, rate=1000.0, duration=3.0, clock=clock, sleep=clock.sleep)
    assert run.sent == 3000
    assert run.seconds == pytest.approx(3.0, abs=0.01)
    # Each second gets its thousand, give or take the record due exactly on a boundary.
    assert len(run.per_second) == 3
    assert all(abs(c - 1000) <= 1 for c in run.per_second)
    # Sent in ~5 ms slices of ~5 records, never one record per sleep.
    assert max(batches) <= 6
    assert len(batches) == pytest.approx(600, rel=0.05)
    assert all(s <= 0.0051 for s in clock.sleeps)


def test_run_paced_count_mode_stops_at_count() -> None:
    clock = FakeClock()
    run = run_paced(lambda n: n, rate=500.0, count=1234, clock=clock, sleep=clock.sleep)
    assert run.sent == 1234
    # The last record (index 1233) is due at 1233 / 500 s.
    assert run.seconds == pytest.approx(1233 / 500, abs=0.006)


def test_run_paced_low_rate_sleeps_between_records() -> None:
    clock = FakeClock()
    run = run_paced(lambda n: n, rate=4.0, count=5, clock=clock, sleep=clock.sleep)
    assert run.sent == 5
    assert run.seconds == pytest.approx(1.0)


def test_run_paced_catches_up_after_a_short_stall() -> None:
    clock = FakeClock()
    calls = 0

    def emit(n: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 10:
            clock.now += 0.3  # the producer blocks for 300 ms once
        return n

    run = run_paced(emit, rate=1000.0, duration=2.0, clock=clock, sleep=clock.sleep)
    assert run.sent == 2000  # the backlog was caught up, nothing lost from the schedule
    assert run.seconds == pytest.approx(2.0, abs=0.01)


def test_run_paced_retries_when_emit_is_short() -> None:
    clock = FakeClock()

    def half(n: int) -> int:  # a producer whose queue accepts only half of each request
        return max(1, n // 2)

    run = run_paced(half, rate=1000.0, count=1000, clock=clock, sleep=clock.sleep)
    assert run.sent == 1000
    assert run.seconds < 1.1


def test_run_paced_unpaced_count() -> None:
    clock = FakeClock()

    def emit(n: int) -> int:
        clock.now += n * 1e-6  # 1 us per record
        return n

    run = run_paced(emit, rate=0.0, count=10_000, clock=clock, sleep=clock.sleep, chunk=1000)
    assert run.sent == 10_000
    assert clock.sleeps == []


def test_run_paced_unpaced_duration_stops_at_deadline() -> None:
    clock = FakeClock()

    def emit(n: int) -> int:
        clock.now += n * 1e-5
        return n

    run = run_paced(emit, rate=0.0, duration=1.0, clock=clock, sleep=clock.sleep, chunk=1000)
    assert run.sent == 100_000
    assert run.seconds == pytest.approx(1.0)


def test_run_paced_behind_schedule_does_not_overrun_deadline() -> None:
    clock = FakeClock()

    def slow(n: int) -> int:  # can only manage 100 records per 10 ms: 10k/s
        take = min(n, 100)
        clock.now += 0.01
        return take

    run = run_paced(slow, rate=50_000.0, duration=1.0, clock=clock, sleep=clock.sleep)
    assert run.seconds <= 1.0 + 0.1 + 0.011
    assert 9_000 <= run.sent <= 12_000


def test_run_paced_reports_ticks() -> None:
    clock = FakeClock()
    ticks: list[tuple[float, int]] = []
    run_paced(
        lambda n: n,
        rate=100.0,
        count=50,
        clock=clock,
        sleep=clock.sleep,
        on_tick=lambda t, s: ticks.append((t, s)),
    )
    assert ticks
    assert ticks[-1][1] == 50
    assert [s for _, s in ticks] == sorted(s for _, s in ticks)


def test_run_paced_needs_a_stop_condition() -> None:
    with pytest.raises(ConfigError, match="count or a duration"):
        run_paced(lambda n: n, rate=1.0)


# --------------------------------------------------------------------------- validation


def _valid(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "rate": 100.0,
        "count": 10,
        "duration": None,
        "keys": 10,
        "key_dist": "uniform",
        "zipf_s": 1.1,
        "fmt": "json",
        "partitions": None,
    }
    args.update(over)
    return args


def test_validate_accepts_good_arguments() -> None:
    validate_args(**_valid())
    validate_args(**_valid(count=None, duration=2.5, rate=0.0, partitions=3))


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"count": None, "duration": None}, "--count N or --duration"),
        ({"rate": -1.0}, "rate must be >= 0"),
        ({"rate": float("nan")}, "rate must be >= 0"),
        ({"count": 0}, "count must be at least 1"),
        ({"count": None, "duration": 0.0}, "duration must be a positive"),
        ({"keys": 0}, "keys must be at least 1"),
        ({"key_dist": "normal"}, "uniform' or 'zipf"),
        ({"zipf_s": -2.0}, "zipf skew"),
        ({"fmt": "avro"}, "'json' or 'msgpack'"),
        ({"partitions": 0}, "partitions must be at least 1"),
        ({"procs": 0}, "procs must be between 1 and keys"),
        ({"procs": 11}, "procs must be between 1 and keys"),
    ],
)
def test_validate_rejects_bad_arguments(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        validate_args(**_valid(**over))
    assert isinstance(info.value, DStreamError)


def test_api_validates_before_connecting() -> None:
    # An unroutable bootstrap would hang on connect: validation must fail first.
    with pytest.raises(ConfigError, match="--count N or --duration"):
        produce_pageviews("192.0.2.1:9", "t", rate=10.0)
    with pytest.raises(ConfigError, match="rate must be >= 0"):
        produce_pageviews("192.0.2.1:9", "t", rate=-5.0, count=10)


# --------------------------------------------------------------------------- cli


def test_cli_parses_all_flags() -> None:
    args = build_parser().parse_args(
        [
            "produce",
            "--topic",
            "pv",
            "--rate",
            "20000",
            "--duration",
            "10s",
            "--keys",
            "500",
            "--key-dist",
            "zipf",
            "--zipf-s",
            "1.3",
            "--format",
            "msgpack",
            "--partitions",
            "6",
            "--seed",
            "42",
            "--kafka-bootstrap",
            "h:1",
            "--no-progress",
        ]
    )
    assert (args.func.__module__, args.func.__name__) == ("ops.tools.cli_produce", "_run")
    assert (args.topic, args.rate, args.duration, args.count) == ("pv", 20000.0, 10.0, None)
    assert (args.keys, args.key_dist, args.zipf_s, args.fmt) == (500, "zipf", 1.3, "msgpack")
    assert (args.partitions, args.seed, args.kafka_bootstrap, args.progress) == (
        6,
        42,
        "h:1",
        False,
    )


def test_cli_defaults() -> None:
    args = build_parser().parse_args(["produce", "--topic", "pv", "--count", "5"])
    assert args.rate == 1000.0
    assert args.key_dist == "uniform"
    assert args.fmt == "json"
    assert args.progress is None
    assert args.partitions is None
    assert args.procs == 1


def test_cli_parses_procs() -> None:
    args = build_parser().parse_args(["produce", "--topic", "pv", "--count", "5", "--procs", "2"])
    assert args.procs == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--topic", "t"], "one of the arguments --count --duration is required"),
        (["--topic", "t", "--count", "5", "--duration", "1"], "not allowed with"),
        (["--topic", "t", "--count", "5", "--rate", "-3"], "--rate must be >= 0"),
        (["--topic", "t", "--count", "0"], "--count must be >= 1"),
        (["--topic", "t", "--duration", "0"], "argument --duration: must be positive, got 0"),
        (["--topic", "t", "--duration", "10 sec"], "cannot read '10 sec' as a duration"),
        (["--topic", "t", "--count", "5", "--key-dist", "pareto"], "invalid choice"),
        (["--topic", "t", "--count", "x"], "--count must be a number"),
        (["--topic", "t", "--count", "5", "--procs", "0"], "--procs must be >= 1"),
    ],
)
def test_cli_rejects_bad_flags(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["produce", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTREAM_KAFKA_BOOTSTRAP", "env:1")
    assert resolve_bootstrap("flag:1") == "flag:1"


def test_bootstrap_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTREAM_KAFKA_BOOTSTRAP", "env:1")
    assert resolve_bootstrap(None) == "env:1"


def test_bootstrap_from_dev_services_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from ops.tools import devservices

    monkeypatch.delenv("DSTREAM_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setattr(devservices, "discovered_env", lambda: {"kafka_bootstrap": "dev:7"})
    assert resolve_bootstrap(None) == "dev:7"

    monkeypatch.setattr(devservices, "discovered_env", dict)
    assert resolve_bootstrap(None) == DEFAULT_BOOTSTRAP

    def broken() -> dict[str, str]:
        raise RuntimeError("no state file")

    monkeypatch.setattr(devservices, "discovered_env", broken)
    assert resolve_bootstrap(None) == DEFAULT_BOOTSTRAP


# --------------------------------------------------------------------------- kafka shell (faked)


class FakeProducer:
    """Stands in for confluent_kafka.Producer: acks on poll/flush, fails every 10th record."""

    instances: ClassVar[list[FakeProducer]] = []

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.queued: list[tuple[bytes, bytes, Any]] = []
        self.sent: list[tuple[str, bytes, bytes, int]] = []
        FakeProducer.instances.append(self)

    def produce(  # the real signature's positional order
        self,
        topic: str,
        value: bytes,
        key: bytes,
        partition: int = -1,
        callback: Any = None,
        on_delivery: Any = None,
        timestamp: int = 0,
    ) -> None:
        assert partition == -1  # partitioned by key
        self.sent.append((topic, key, value, timestamp))
        self.queued.append((key, value, callback or on_delivery or self.conf["on_delivery"]))

    def poll(self, timeout: float = 0) -> int:
        served = 0
        for _, _, cb in self.queued:
            served += 1
            cb("boom" if len(self.sent) and served % 10 == 0 else None, None)
        self.queued.clear()
        return served

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0


class FakeAdmin:
    def list_topics(self, timeout: float = 0) -> None:
        return None


@pytest.fixture
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> type[FakeProducer]:
    import confluent_kafka

    import ops.tools.produce

    FakeProducer.instances = []
    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    monkeypatch.setattr(ops.tools.produce, "_quiet_admin", lambda *a, **k: FakeAdmin())
    return FakeProducer


def test_shell_counts_delivery_errors_and_keys_by_url(fake_kafka: type[FakeProducer]) -> None:
    import io

    stream = io.StringIO()
    result = produce_pageviews(
        "fake:1",
        "pv",
        rate=0,
        count=1_000,
        keys=20,
        seed=4,
        progress=True,
        progress_stream=stream,
        extra_config={"linger.ms": 20, "client.id": "mine"},
    )
    (producer,) = fake_kafka.instances
    assert producer.conf["bootstrap.servers"] == "fake:1"
    assert producer.conf["linger.ms"] == 20  # pass-through wins over the harness defaults
    assert producer.conf["enable.idempotence"] is True
    assert len(producer.sent) == 1_000
    assert result.records + result.errors == 1_000
    assert result.errors > 0
    assert result.first_error == "boom"
    for topic, key, value, ts in producer.sent:
        ev = json.loads(value)
        assert topic == "pv"
        assert key == ev["url"].encode()
        assert ts == ev["ts"]
    want = [e["url"] for e in pageview_events(1_000, 20, "uniform", seed=4)]
    assert [json.loads(v)["url"] for _, _, v, _ in producer.sent] == want


def test_cli_exits_1_on_delivery_errors(
    fake_kafka: type[FakeProducer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ops.cli import main

    monkeypatch.delenv("DSTREAM_KAFKA_CONFIG", raising=False)
    code = main(["produce", "--topic", "pv", "--count", "100", "--rate", "0", "--bootstrap", "f:1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "produced 90 records to pv" in out
    assert "10 errors" in out
    assert "first delivery error: boom" in err


def test_cli_passes_kafka_config_through(
    fake_kafka: type[FakeProducer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ops.cli import main

    monkeypatch.setenv("DSTREAM_KAFKA_CONFIG", '{"compression.type": "zstd"}')
    monkeypatch.setenv("DSTREAM_KAFKA_BOOTSTRAP", "envhost:9")
    main(["produce", "--topic", "pv", "--count", "5", "--rate", "0", "--format", "msgpack"])
    (producer,) = fake_kafka.instances
    assert producer.conf["compression.type"] == "zstd"
    assert producer.conf["bootstrap.servers"] == "envhost:9"
    assert "produced" in capsys.readouterr().out


def test_progress_line_is_throttled_and_shows_rate_and_target() -> None:
    import io

    from ops.tools.produce import _Progress

    stream = io.StringIO()
    progress = _Progress(stream, "pv", 20_000.0, every=0.5)
    progress(0.0, 0)
    progress(0.2, 4_000)  # too soon: nothing
    progress(0.5, 10_000)
    progress(1.0, 20_000)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "produce pv: 10,000 sent, 20,000 rec/s (target 20,000/s)",
        "produce pv: 20,000 sent, 20,000 rec/s (target 20,000/s)",
    ]


# --------------------------------------------------------------------------- hot loop


def _emitted(
    shard: int,
    shards: int,
    *,
    n: int = 3_000,
    keys: int = 37,
    dist: str = "zipf",
    fmt: str = "json",
    seed: int = 3,
    produce: Any = None,
) -> tuple[list[dict[str, Any]], Any]:
    """Events one shard's emitter hands over for the first *n* events of the stream."""
    from ops.tools.produce import _pageview_emitter, _SendStats

    sent: list[dict[str, Any]] = []

    def record(topic: str, value: bytes, key: bytes, *rest: Any) -> None:
        assert topic == "pv"
        assert rest[:2] == (-1, None)
        ev = json.loads(value) if fmt == "json" else msgpack.unpackb(value, raw=False)
        assert key == ev["url"].encode()
        assert rest[3] == ev["ts"]
        sent.append(ev)

    stats = _SendStats()
    emit = _pageview_emitter(
        produce or record,
        lambda _t: None,
        "pv",
        stats,
        keys=keys,
        key_dist=dist,
        zipf_s=1.1,
        seed=seed,
        fmt=fmt,
        shard=shard,
        shards=shards,
    )
    walked = 0
    for size in (1, 999, 2_000):  # emit in uneven calls: state carries over
        walked += emit(min(size, n - walked))
    assert walked == n
    return sent, stats


@pytest.mark.parametrize("dist", ["uniform", "zipf"])
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize("keys", [1, 37, 64])
def test_hot_loop_sends_exactly_the_seeded_stream(dist: str, fmt: str, keys: int) -> None:
    sent, stats = _emitted(0, 1, keys=keys, dist=dist, fmt=fmt)
    want = list(pageview_events(3_000, keys, dist, seed=3, zipf_s=1.1))
    strip = [{k: e[k] for k in ("url", "user", "seq")} for e in sent]
    assert strip == [{k: e[k] for k in ("url", "user", "seq")} for e in want]
    assert stats.handed == 3_000
    assert stats.refused == 0


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("dist", ["uniform", "zipf"])
def test_shards_split_urls_and_together_send_the_stream_once(shards: int, dist: str) -> None:
    want = Counter(
        (e["url"], e["user"], e["seq"]) for e in pageview_events(3_000, 37, dist, seed=3)
    )
    got: Counter[tuple[str, str, int]] = Counter()
    owners: dict[str, int] = {}
    for shard in range(shards):
        sent, stats = _emitted(shard, shards, dist=dist)
        assert sent, f"shard {shard} sent nothing"
        assert stats.handed == len(sent)
        seqs: dict[str, list[int]] = {}
        for ev in sent:
            k = int(ev["url"].removeprefix("/page/"))
            assert k % shards == shard
            assert owners.setdefault(ev["url"], shard) == shard  # no url in two shards
            seqs.setdefault(ev["url"], []).append(ev["seq"])
            got[(ev["url"], ev["user"], ev["seq"])] += 1
        for url, s in seqs.items():
            assert s == list(range(len(s))), url  # in order, from 0, no gaps
    assert got == want


def test_json_template_is_byte_identical_to_encode_event() -> None:
    from ops.tools.produce import _JSON_TEMPLATE

    for k, u, ts, seq in [(0, 0, 0, 0), (999, 9_999, 1_700_000_000_123, 123_456)]:
        ev = {"url": f"/page/{k}", "user": f"u{u}", "ts": ts, "seq": seq}
        assert _JSON_TEMPLATE % (k, u, ts, seq) == encode_event(ev, "json")


def test_hot_loop_stamps_wall_clock_at_hand_over() -> None:
    import time

    before = time.time_ns() // 1_000_000
    sent, _ = _emitted(0, 1, n=100)
    after = time.time_ns() // 1_000_000
    assert all(before <= e["ts"] <= after for e in sent)
    assert [e["ts"] for e in sent] == sorted(e["ts"] for e in sent)


def test_full_queue_keeps_order_and_loses_nothing() -> None:
    from ops.tools.produce import _pageview_emitter, _SendStats

    sent: list[dict[str, Any]] = []
    calls = 0

    def flaky(topic: str, value: bytes, key: bytes, *rest: Any) -> None:
        nonlocal calls
        calls += 1
        if calls % 7 == 0:
            raise BufferError("Local: Queue full")
        sent.append(json.loads(value))

    stats = _SendStats()
    emit = _pageview_emitter(
        flaky,
        lambda _t: None,
        "pv",
        stats,
        keys=20,
        key_dist="uniform",
        zipf_s=1.1,
        seed=8,
        fmt="json",
    )
    walked = 0
    rounds = 0
    while walked < 2_000:
        got = emit(min(50, 2_000 - walked))
        assert 0 <= got <= 50
        walked += got
        rounds += 1
    assert rounds > 40  # some calls came back short
    want = list(pageview_events(2_000, 20, "uniform", seed=8))
    assert [(e["url"], e["user"], e["seq"]) for e in sent] == [
        (e["url"], e["user"], e["seq"]) for e in want
    ]
    assert stats.handed == 2_000


def test_refused_records_are_counted_as_failed() -> None:
    from confluent_kafka import KafkaError, KafkaException

    calls = 0

    def picky(topic: str, value: bytes, key: bytes, *rest: Any) -> None:
        nonlocal calls
        calls += 1
        if calls % 10 == 0:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"))

    _, stats = _emitted(0, 1, n=1_000, produce=picky)
    assert (stats.handed, stats.refused) == (900, 100)
    assert "too large" in stats.first_refusal


def test_merge_sums_processes() -> None:
    from ops.tools.produce import ProduceResult, _merge

    a = ProduceResult(10, 2.0, 5.0, 1, (4, 6), "", (10,))
    b = ProduceResult(20, 2.5, 8.0, 0, (7, 8, 5), "", (20,))
    b_err = ProduceResult(20, 2.5, 8.0, 2, (7, 8, 5), "boom", (20,))
    m = _merge([a, b])
    assert (m.records, m.seconds, m.errors) == (30, 2.5, 1)
    assert m.rate == pytest.approx(12.0)
    assert m.per_second == (11, 14, 5)
    assert m.per_process == (10, 20)
    assert _merge([a, b_err]).first_error == "boom"


def test_api_rejects_more_procs_than_urls() -> None:
    with pytest.raises(ConfigError, match="procs must be between"):
        produce_pageviews("192.0.2.1:9", "t", rate=0, count=10, keys=3, procs=4)
