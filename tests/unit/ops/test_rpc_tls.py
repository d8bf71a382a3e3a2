"""Mutual TLS on the RPC transport (ops/tls.py, ops/rpc.py, the ops/services.py factories).

Real loopback sockets and real TLS (certificates made with ``cryptography``); no mocks.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.errors import AuthError, ConfigError
from ops.config import Settings, load_settings
from ops.rpc import Peer, RpcClient, RpcServer
from ops.services import rpc_client, rpc_server
from ops.tls import MutualTls, TlsFiles, client_context, from_settings
from tests.tlskit import Ca, Leaf, SecretDir, make_ca, make_leaf, server_cert, write_files

pytestmark = pytest.mark.unit

SECRET = "tls-tests-secret"
#: the rotation check period of these tests (the fleet's default is 5 s)
PERIOD = 0.2


def _handler(calls: list[str]) -> Callable[[str, Any, Peer], Any]:
    def handle(method: str, params: Any, peer: Peer) -> Any:
        calls.append(method)
        if method == "echo":
            return params
        if method == "whoami":  # the client certificate the server verified
            assert peer.certificate is not None
            return hashlib.sha256(peer.certificate).hexdigest()
        raise ValueError(method)

    return handle


def _sha(leaf: Leaf) -> str:
    return hashlib.sha256(leaf.der).hexdigest()


def _settings(cert: str = "", key: str = "", ca: str = "") -> Settings:
    return Settings(secret=SECRET, tls_cert=cert, tls_key=key, tls_ca=ca)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.fixture(scope="module")
def ca() -> Ca:
    return make_ca("fleet-ca")


@pytest.fixture(scope="module")
def other_ca() -> Ca:
    return make_ca("someone-elses-ca")


@pytest.fixture
def fleet(tmp_path: Path, ca: Ca) -> Iterator[tuple[RpcServer, Settings, list[str]]]:
    """A TLS server built by the fleet's factory, its settings and the handler's calls."""
    cert, key, ca_file = write_files(tmp_path / "server", make_leaf(ca, "coordinator"), ca.pem)
    settings = _settings(cert, key, ca_file)
    calls: list[str] = []
    srv = rpc_server(settings, _handler(calls), port=0, name="tls-test", host="127.0.0.1")
    srv.start()
    yield srv, settings, calls
    srv.stop()


def test_factories_speak_mutual_tls_and_check_the_secret(
    fleet: Any, tmp_path: Path, ca: Ca
) -> None:
    srv, _, calls = fleet
    leaf = make_leaf(ca, "worker-0")
    cert, key, ca_file = write_files(tmp_path / "client", leaf, ca.pem)
    c = rpc_client(_settings(cert, key, ca_file), "{}:{}".format(*srv.address))
    with c:
        assert c.call("echo", {"blob": b"\x00" * 300_000}) == {"blob": b"\x00" * 300_000}
        assert c.call("whoami") == _sha(leaf)  # the server saw and verified our certificate
    # the shared secret still applies inside TLS: a valid certificate is not enough
    wrong = Settings(secret="not-the-secret", tls_cert=cert, tls_key=key, tls_ca=ca_file)
    with (
        rpc_client(wrong, "{}:{}".format(*srv.address)) as bad,
        pytest.raises(AuthError, match="rejected our credentials"),
    ):
        bad.call("echo", 1)
    assert calls == ["echo", "whoami"]
    assert srv.tls_refusals == 0  # the wrong secret failed inside TLS, not at it


def test_negotiates_tls_1_2_or_later(fleet: Any, ca: Ca) -> None:
    srv, settings, _ = fleet
    ctx = from_settings(settings)
    assert ctx is not None
    assert ctx.server().minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.client().minimum_version >= ssl.TLSVersion.TLSv1_2
    client = ctx.client()
    with (
        socket.create_connection(srv.address, timeout=5) as raw,
        client.wrap_socket(raw) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_plain_tcp_client_gets_no_rpc_answer(fleet: Any) -> None:
    srv, _, calls = fleet
    # 1. our own client without TLS: the server never greets it
    plain = RpcClient(srv.address, secret=SECRET.encode(), handshake_timeout=0.5)
    with plain, pytest.raises(AuthError, match="did not greet"):
        plain.call("echo", 1)
    # 2. raw TCP speaking the RPC framing: what comes back is no RPC frame (a TLS alert or
    # nothing), and the handler never runs
    with socket.create_connection(srv.address, timeout=5) as s:
        body = b"\x94\x00\x01\xa4echo\x01"  # msgpack [0, 1, "echo", 1]
        s.sendall(struct.pack(">I", len(body)) + body)
        got = b""
        while True:
            try:
                chunk = s.recv(4096)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            got += chunk
    assert b"DSR1" not in got
    assert not got or got[0] == 0x15  # 0x15: a TLS alert record
    assert calls == []
    assert wait_until(lambda: srv.tls_refusals == 2)


def test_client_with_certificate_from_another_ca_is_refused(
    fleet: Any, tmp_path: Path, other_ca: Ca
) -> None:
    srv, _, calls = fleet
    cert, key, ca_file = write_files(tmp_path / "x", make_leaf(other_ca, "intruder"), other_ca.pem)
    with (
        rpc_client(_settings(cert, key, ca_file), "{}:{}".format(*srv.address)) as c,
        pytest.raises(AuthError, match="TLS"),
    ):
        c.call("echo", 1)
    # even an intruder that trusts our CA (so it accepts our server) is refused
    cert, key, _ = write_files(tmp_path / "y", make_leaf(other_ca, "intruder"), other_ca.pem)
    ca_file = str(tmp_path / "server" / "ca.pem")
    with (
        rpc_client(_settings(cert, key, ca_file), "{}:{}".format(*srv.address)) as c,
        pytest.raises(AuthError, match=r"refused the TLS connection|TLS handshake"),
    ):
        c.call("echo", 1)
    assert calls == []
    assert wait_until(lambda: srv.tls_refusals == 2)


@pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_certificate_is_refused(
    fleet: Any, tmp_path: Path, ca: Ca, tls_max: ssl.TLSVersion
) -> None:
    srv, _, calls = fleet
    _, _, ca_file = write_files(tmp_path / "anon", None, ca.pem)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.check_hostname = False
    ctx.maximum_version = tls_max
    with (
        RpcClient(srv.address, secret=SECRET.encode(), ssl_context=ctx) as c,
        pytest.raises(AuthError, match="TLS"),
    ):
        c.call("echo", 1)  # the server is fine by us, but we are not by the server
    assert calls == []
    assert wait_until(lambda: srv.tls_refusals == 1)


def test_refusal_is_logged_once_per_peer(
    fleet: Any, tmp_path: Path, other_ca: Ca, caplog: pytest.LogCaptureFixture
) -> None:
    srv, _, calls = fleet
    caplog.set_level(logging.WARNING, logger="ops.rpc")
    cert, key, ca_file = write_files(tmp_path / "x", make_leaf(other_ca, "intruder"), other_ca.pem)
    settings = _settings(cert, key, ca_file)
    for _ in range(5):  # one misconfigured peer, retrying
        with rpc_client(settings, "{}:{}".format(*srv.address)) as c, pytest.raises(AuthError):
            c.call("echo", 1)
    assert wait_until(lambda: srv.tls_refusals == 5)
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in refused]
    assert "127.0.0.1" in refused[0].getMessage()
    assert "certificate" in refused[0].getMessage().lower()
    # another peer host (Linux routes all of 127/8 to loopback) is logged, once as well
    for _ in range(3):
        with socket.create_connection(srv.address, source_address=("127.0.0.2", 0)) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
    assert wait_until(lambda: srv.tls_refusals == 8)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 2, refused
    assert "127.0.0.2" in refused[1]
    assert calls == []


def test_rotation_new_connections_use_new_files(
    tmp_path: Path, ca: Ca, other_ca: Ca, caplog: pytest.LogCaptureFixture
) -> None:
    """A Secret update (symlink swap) reaches new connections within the check period."""
    caplog.set_level(logging.INFO, logger="ops.tls")
    leaf1, client1 = make_leaf(ca, "coordinator"), make_leaf(ca, "worker")
    server_dir = SecretDir(tmp_path / "server", leaf1, ca.pem)
    client_dir = SecretDir(tmp_path / "client", client1, ca.pem)
    server_tls = MutualTls(
        TlsFiles(server_dir.cert, server_dir.key, server_dir.ca), check_every=PERIOD
    )
    client_tls = MutualTls(
        TlsFiles(client_dir.cert, client_dir.key, client_dir.ca), check_every=PERIOD
    )
    calls: list[str] = []
    with RpcServer(_handler(calls), secret=SECRET.encode(), ssl_context=server_tls.server) as srv:
        probe = make_leaf(ca, "probe")
        assert server_cert(srv.address, ca.pem, probe) == leaf1.der
        old = RpcClient(srv.address, secret=SECRET.encode(), ssl_context=client_tls.client)
        with old:
            assert old.call("whoami") == _sha(client1)

            # 1. both sides get new certificates from the same CA
            leaf2, client2 = make_leaf(ca, "coordinator"), make_leaf(ca, "worker")
            server_dir.update(leaf2, ca.pem)
            client_dir.update(client2, ca.pem)
            time.sleep(1.5 * PERIOD)  # one check period: the next connections use them
            assert server_cert(srv.address, ca.pem, probe) == leaf2.der

            def new_client_is(leaf: Leaf) -> bool:
                with RpcClient(
                    srv.address, secret=SECRET.encode(), ssl_context=client_tls.client
                ) as c:
                    return bool(c.call("whoami") == _sha(leaf))

            assert new_client_is(client2)
            assert old.call("whoami") == _sha(client1)  # established: keeps its identity

            # 2. a CA rotation: bundle old+new CA, then certificates of the new CA only
            bundle = ca.pem + other_ca.pem
            server_dir.update(leaf2, bundle)
            client_dir.update(client2, bundle)
            time.sleep(1.5 * PERIOD)
            assert new_client_is(client2)
            assert (server_tls.reloads, client_tls.reloads) == (2, 2)
            leaf3, client3 = make_leaf(other_ca, "coordinator"), make_leaf(other_ca, "worker")
            server_dir.update(leaf3, other_ca.pem)
            client_dir.update(client3, other_ca.pem)
            time.sleep(1.5 * PERIOD)
            assert new_client_is(client3)
            assert server_cert(srv.address, other_ca.pem, make_leaf(other_ca)) == leaf3.der
            # the old CA is no longer trusted by the server
            with (
                socket.create_connection(srv.address, timeout=5) as raw,
                pytest.raises(ssl.SSLError),
            ):
                with_old = client_context(TlsFiles(*write_files(tmp_path / "o", probe, bundle)))
                with with_old.wrap_socket(raw) as t:
                    t.recv(1)  # TLS 1.3: the refusal arrives after the client's handshake
    assert server_tls.reloads == 3
    assert client_tls.reloads == 3
    assert (
        sum("new connections use the new certificate" in r.getMessage() for r in caplog.records)
        == 6
    )


def test_half_written_pair_keeps_the_old_context(
    tmp_path: Path, ca: Ca, caplog: pytest.LogCaptureFixture
) -> None:
    """Files replaced in place, one at a time: the server keeps serving the old pair."""
    leaf1 = make_leaf(ca, "coordinator")
    cert, key, ca_file = write_files(tmp_path / "s", leaf1, ca.pem)
    tls = MutualTls(TlsFiles(cert, key, ca_file), check_every=PERIOD)
    calls: list[str] = []
    probe = make_leaf(ca, "probe")
    with RpcServer(_handler(calls), secret=SECRET.encode(), ssl_context=tls.server) as srv:
        leaf2 = make_leaf(ca, "coordinator")
        Path(cert).write_bytes(leaf2.pem)  # the new certificate, the old key still in place
        time.sleep(2 * PERIOD)
        for _ in range(3):  # every check fails to load: old pair served, warned once
            assert server_cert(srv.address, ca.pem, probe) == leaf1.der
            time.sleep(PERIOD)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert sum("do not load" in m for m in warnings) == 1, warnings
        # a truncated certificate (a writer caught mid-write) does not break it either
        Path(cert).write_bytes(leaf2.pem[:100])
        time.sleep(2 * PERIOD)
        assert server_cert(srv.address, ca.pem, probe) == leaf1.der
        Path(cert).write_bytes(leaf2.pem)
        Path(key).write_bytes(leaf2.key_pem)  # the pair is complete: it is used
        assert wait_until(lambda: server_cert(srv.address, ca.pem, probe) == leaf2.der, 10 * PERIOD)
    assert tls.reloads == 1


def test_missing_file_during_a_swap_keeps_the_old_context(tmp_path: Path, ca: Ca) -> None:
    leaf1 = make_leaf(ca, "coordinator")
    cert, key, ca_file = write_files(tmp_path / "s", leaf1, ca.pem)
    tls = MutualTls(TlsFiles(cert, key, ca_file), check_every=0)
    Path(key).unlink()
    with RpcServer(_handler([]), secret=SECRET.encode(), ssl_context=tls.server) as srv:
        assert server_cert(srv.address, ca.pem, make_leaf(ca)) == leaf1.der
    assert tls.reloads == 0


def test_partial_tls_settings_are_a_config_error(tmp_path: Path, ca: Ca) -> None:
    cert, key, ca_file = write_files(tmp_path, make_leaf(ca), ca.pem)
    assert from_settings(_settings()) is None
    partials = (
        {"cert": cert},
        {"cert": cert, "key": key},
        {"key": key, "ca": ca_file},
        {"ca": ca_file},
    )
    for partial in partials:
        # built as a process builds them (load_settings), so that the check may live in the
        # settings model or in the factories: either way, a clear error at start-up
        given = {f"tls_{k}": v for k, v in partial.items()}
        with pytest.raises(ConfigError, match="set all three") as err:
            rpc_server(load_settings(secret=SECRET, **given), _handler([]), port=0, name="x")
        assert "DSTREAM_TLS_" in str(err.value)
        with pytest.raises(ConfigError, match="set all three"):
            rpc_client(load_settings(secret=SECRET, **given), "127.0.0.1:1")
    with pytest.raises(ConfigError, match="cannot load the RPC TLS files"):
        rpc_server(_settings(cert, key, str(tmp_path / "nope.pem")), _handler([]), port=0, name="x")
    other = make_leaf(ca)
    (tmp_path / "other-key.pem").write_bytes(other.key_pem)
    with pytest.raises(ConfigError, match=r"(?i)key values mismatch"):
        from_settings(_settings(cert, str(tmp_path / "other-key.pem"), ca_file))


def test_one_context_holder_per_process(tmp_path: Path, ca: Ca) -> None:
    cert, key, ca_file = write_files(tmp_path, make_leaf(ca), ca.pem)
    a = from_settings(_settings(cert, key, ca_file))
    b = from_settings(_settings(cert, key, ca_file))
    assert a is not None and a is b


def test_concurrent_connects_during_rotation(tmp_path: Path, ca: Ca) -> None:
    """Many threads connecting while the files are swapped: every call succeeds."""
    server_dir = SecretDir(tmp_path / "s", make_leaf(ca), ca.pem)
    client_dir = SecretDir(tmp_path / "c", make_leaf(ca), ca.pem)
    server_tls = MutualTls(TlsFiles(server_dir.cert, server_dir.key, server_dir.ca), check_every=0)
    client_tls = MutualTls(TlsFiles(client_dir.cert, client_dir.key, client_dir.ca), check_every=0)
    errors: list[BaseException] = []
    stop = threading.Event()
    with RpcServer(_handler([]), secret=SECRET.encode(), ssl_context=server_tls.server) as srv:

        def connect_loop() -> None:
            try:
                while not stop.is_set():
                    with RpcClient(
                        srv.address, secret=SECRET.encode(), ssl_context=client_tls.client
                    ) as c:
                        assert c.call("echo", 7) == 7
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=connect_loop) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(10):
            server_dir.update(make_leaf(ca), ca.pem)
            client_dir.update(make_leaf(ca), ca.pem)
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert server_tls.reloads >= 1 and client_tls.reloads >= 1


def test_files_are_checked_at_most_once_per_period(tmp_path: Path, ca: Ca) -> None:
    """The check period bounds both the staleness and the cost of the check (fake clock)."""
    now = [100.0]
    secret_dir = SecretDir(tmp_path / "s", make_leaf(ca), ca.pem)
    tls = MutualTls(
        TlsFiles(secret_dir.cert, secret_dir.key, secret_dir.ca),
        check_every=5.0,
        clock=lambda: now[0],
    )
    first = tls.server()
    secret_dir.update(make_leaf(ca), ca.pem)
    now[0] += 4.9
    assert tls.server() is first  # within the period: the files are not even looked at
    now[0] += 0.2
    second = tls.server()  # the first connection after the period gets the new files
    assert second is not first
    assert tls.client() is not None and tls.reloads == 1
    now[0] += 60
    assert tls.server() is second  # unchanged files: no rebuild
    assert tls.reloads == 1
