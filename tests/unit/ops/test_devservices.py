"""Pure parts of ops.tools.devservices: no Kafka, no Redis, no JVM is started here."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import ServiceError
from ops.cli import build_parser, main
from ops.tools import devservices as ds


def _props(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.fixture
def no_tools_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    return empty


def _fake_process(mark: str) -> subprocess.Popen[bytes]:
    """A sleeping python whose command line contains *mark* (looks like the service)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", mark])


def test_server_properties_single_node_kraft(tmp_path: Path) -> None:
    p = _props(ds.render_server_properties(tmp_path / "data", 29092, 29093))
    assert p["process.roles"] == "broker,controller"
    assert p["node.id"] == "1"
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert p["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29092"
    assert p["controller.quorum.bootstrap.servers"] == "127.0.0.1:29093"
    assert p["controller.listener.names"] == "CONTROLLER"
    assert p["log.dirs"] == str(tmp_path / "data")
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
    ):
        assert p[key] == "1"
    assert p["group.initial.rebalance.delay.ms"] == "0"


def test_server_properties_extra_overrides_and_is_deterministic(tmp_path: Path) -> None:
    a = ds.render_server_properties(tmp_path, 1, 2, extra={"num.partitions": "3", "x.y": "z"})
    assert a == ds.render_server_properties(
        tmp_path, 1, 2, extra={"num.partitions": "3", "x.y": "z"}
    )
    p = _props(a)
    assert p["num.partitions"] == "3"
    assert p["x.y"] == "z"


def test_cluster_id_is_kafka_uuid_format() -> None:
    ids = {ds.new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cid in ids:
        assert len(cid) == 22
        assert not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_state_round_trip(tmp_path: Path) -> None:
    state = ds.DevState(
        kafka=ds.KafkaHandle(123, 19092, 19093, tmp_path / "kafka"),
        redis=ds.RedisHandle(456, 16379, tmp_path / "redis"),
    )
    ds.save_state(state, tmp_path)
    assert ds.load_state(tmp_path) == state
    raw = json.loads((tmp_path / "state.json").read_text())
    assert raw["kafka"]["bootstrap"] == "127.0.0.1:19092"
    assert raw["redis"]["url"] == "redis://127.0.0.1:16379/0"
    assert not list(tmp_path.glob(".state.json*"))  # temp file renamed away


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"kafka": {"pid": 1}}'])
def test_missing_or_corrupt_state_reads_as_nothing(tmp_path: Path, content: str) -> None:
    assert ds.load_state(tmp_path / "absent") == ds.DevState()
    (tmp_path / "state.json").write_text(content)
    assert ds.load_state(tmp_path) == ds.DevState()
    assert ds.discovered_env(tmp_path) == {}


def test_discovered_env_only_lists_running_services(tmp_path: Path) -> None:
    kafka_like = _fake_process("kafka.Kafka")
    try:
        state = ds.DevState(
            kafka=ds.KafkaHandle(kafka_like.pid, 19092, 19093, tmp_path / "kafka"),
            # a live pid that is not redis-server: treated as gone (pid reuse guard)
            redis=ds.RedisHandle(kafka_like.pid, 16379, tmp_path / "redis"),
        )
        ds.save_state(state, tmp_path)
        assert ds.discovered_env(tmp_path) == {"kafka_bootstrap": "127.0.0.1:19092"}
        lines = {s.name: s for s in ds.status(tmp_path, environ={})}
        assert lines["kafka"].state == "running"
        assert lines["redis"].state == "stopped"
    finally:
        kafka_like.kill()
        kafka_like.wait()
    assert ds.discovered_env(tmp_path) == {}


def test_status_reports_external_services(tmp_path: Path) -> None:
    env = {"DSTREAM_KAFKA_BOOTSTRAP": "k:9092", "DSTREAM_REDIS_URL": "redis://r:6379/0"}
    lines = ds.status(tmp_path, environ=env)
    assert [(s.name, s.state, s.address) for s in lines] == [
        ("kafka", "external", "k:9092"),
        ("redis", "external", "redis://r:6379/0"),
    ]


def test_up_with_external_services_starts_nothing(tmp_path: Path) -> None:
    env = {"DSTREAM_KAFKA_BOOTSTRAP": "k:9092", "DSTREAM_REDIS_URL": "redis://r:6379/0"}
    lines = ds.up(tmp_path, environ=env)
    assert {s.state for s in lines} == {"external"}
    assert ds.load_state(tmp_path) == ds.DevState()


def test_down_on_empty_home_is_harmless(tmp_path: Path) -> None:
    assert ds.down(tmp_path) == []
    assert ds.down(tmp_path) == []


def test_stop_handle_terminates_process_and_removes_pid_file(tmp_path: Path) -> None:
    proc = _fake_process("redis-server")
    (tmp_path / "redis.pid").write_text(f"{proc.pid}\n")
    handle = ds.RedisHandle(proc.pid, 1, tmp_path)
    assert handle.is_running()
    handle.stop(timeout=5)
    proc.wait(5)
    assert not handle.is_running()
    assert not (tmp_path / "redis.pid").exists()
    handle.stop()  # idempotent


def test_free_port_is_bindable() -> None:
    port = ds.free_port()
    assert not ds.port_in_use(port)


def test_port_in_use_error(busy_port: int) -> None:
    assert ds.port_in_use(busy_port)
    with pytest.raises(ServiceError, match=rf"Kafka port {busy_port} .* in use.*--kafka-port"):
        ds.ensure_port_free(busy_port, "Kafka", "--kafka-port")


def test_start_kafka_refuses_busy_port(tmp_path: Path, busy_port: int) -> None:
    with pytest.raises(ServiceError, match=rf"^Kafka port {busy_port} on 127.0.0.1 is already"):
        ds.start_kafka(tmp_path, busy_port, ds.free_port(), java=sys.executable, libs=tmp_path)
    assert not (tmp_path / "kafka.pid").exists()


def test_start_redis_refuses_busy_port(tmp_path: Path, busy_port: int) -> None:
    with pytest.raises(ServiceError, match=rf"^Redis port {busy_port} .*--redis-port"):
        ds.start_redis(tmp_path, busy_port, redis_server=sys.executable)


def test_missing_java_is_one_clear_line(tmp_path: Path, no_tools_path: Path) -> None:
    with pytest.raises(ServiceError) as info:
        ds.start_kafka(tmp_path, ds.free_port(), ds.free_port(), libs=tmp_path)
    assert str(info.value).startswith("java not found on PATH: install a Java 17+")
    assert "\n" not in str(info.value)


def test_missing_java_explicit_path(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="java not found at /nonexistent/java"):
        ds.find_executable("java", "hint", "/nonexistent/java")


def test_missing_mvn_is_one_clear_line(tmp_path: Path, no_tools_path: Path) -> None:
    with pytest.raises(ServiceError, match=r"^mvn not found on PATH: install Maven"):
        ds.ensure_kafka_libs(tmp_path)


def test_cli_dev_up_without_java_exits_1(
    tmp_path: Path,
    no_tools_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("DSTREAM_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("DSTREAM_REDIS_URL", raising=False)
    args = ["dev", "--home", str(tmp_path), "up", "--kafka-port", str(ds.free_port())]
    args += ["--controller-port", str(ds.free_port()), "--redis-port", str(ds.free_port())]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("dstream: java not found on PATH")
    assert err.count("\n") == 1
    assert ds.load_state(tmp_path) == ds.DevState()  # nothing was started


def test_cli_dev_env_without_services_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DSTREAM_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("DSTREAM_REDIS_URL", raising=False)
    assert main(["dev", "--home", str(tmp_path), "env"]) == 1
    assert "dstream dev up" in capsys.readouterr().err


def test_cli_dev_env_prints_external_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DSTREAM_KAFKA_BOOTSTRAP", "k:1")
    monkeypatch.setenv("DSTREAM_REDIS_URL", "redis://r:2/0")
    assert main(["dev", "--home", str(tmp_path), "env"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "export DSTREAM_KAFKA_BOOTSTRAP=k:1",
        "export DSTREAM_REDIS_URL=redis://r:2/0",
    ]


def test_cli_parser_has_dev_actions() -> None:
    parser = build_parser()
    for action in ("up", "down", "status", "env", "ensure"):
        args = parser.parse_args(["dev", action])
        assert callable(args.func)
    args = parser.parse_args(["dev", "up", "--kafka-port", "1", "--redis-port", "2"])
    assert (args.kafka_port, args.redis_port, args.controller_port) == (1, 2, 19093)


def test_tier_marker_applied(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
