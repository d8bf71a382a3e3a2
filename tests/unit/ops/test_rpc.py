"""Unit tests of the RPC transport (ops/rpc.py): loopback sockets only, no services."""

from __future__ import annotations

import ast
import datetime
import hashlib
import hmac
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ops.rpc as rpc
from engine.errors import AuthError, ConfigError, FrameTooLarge
from ops.rpc import ConnectionLost, Peer, RemoteError, RpcClient, RpcServer, RpcTimeout

pytestmark = pytest.mark.unit

SECRET = b"s3cret-for-tests"


class Recorder:
    """A handler that records calls and implements a few test methods."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, method: str, params: Any, peer: Peer) -> Any:
        self.calls.append(method)
        if method == "echo":
            return params
        if method == "boom":
            raise KeyError("no such partition: 7")
        if method == "block":
            self.entered.set()
            self.release.wait(10)
            return "released"
        if method == "big":
            return b"x" * params
        if method == "sleep":
            time.sleep(params)
            return params
        if method == "push":
            for i in range(params):
                peer.notify("tick", {"i": i, "blob": b"\x00\x01"})
            return "pushed"
        raise ValueError(f"unknown method {method!r}")


@pytest.fixture
def handler() -> Recorder:
    return Recorder()


@pytest.fixture
def server(handler: Recorder) -> Iterator[RpcServer]:
    srv = RpcServer(handler, secret=SECRET, handshake_timeout=0.5).start()
    yield srv
    handler.release.set()
    srv.stop()


@pytest.fixture
def client(server: RpcServer) -> Iterator[RpcClient]:
    with RpcClient(server.address, secret=SECRET) as c:
        yield c


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _raw_authenticated(address: tuple[str, int], secret: bytes = SECRET) -> socket.socket:
    """Do the handshake by hand (as the protocol is documented) on a raw socket."""
    sock = socket.create_connection(address, timeout=5)
    try:
        (size,) = struct.unpack(">I", _read_exact(sock, 4))
        hello = _read_exact(sock, size)
        assert hello[:4] == b"DSR1"
        server_nonce, client_nonce = hello[4:], os.urandom(32)
        mac = hmac.new(secret, b"client" + server_nonce + client_nonce, hashlib.sha256)
        sock.sendall(_frame(client_nonce + mac.digest()))
        (size,) = struct.unpack(">I", _read_exact(sock, 4))
        proof = _read_exact(sock, size)
        expected = hmac.new(secret, b"server" + client_nonce + server_nonce, hashlib.sha256)
        assert hmac.compare_digest(proof, expected.digest())
    except BaseException:
        sock.close()
        raise
    return sock


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True if the peer closes *sock* (EOF or reset) within *within* seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_round_trip_nested_values_and_large_bytes(client: RpcClient) -> None:
    nested = {"a": [1, 2.5, None, True, "é"], "b": {"c": b"\x00\xff" * 10}, 7: [[], {}]}
    assert client.call("echo", nested) == nested
    big = os.urandom(10 * 1024 * 1024)
    out = client.call("echo", {"blob": big})
    assert isinstance(out["blob"], bytes)
    assert out["blob"] == big
    assert client.call("echo") is None


def test_concurrent_calls_get_their_own_answers(client: RpcClient) -> None:
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            results[n] = [client.call("echo", [n, i, b"x" * (n * 1000)]) for i in range(50)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for n in range(8):
        assert results[n] == [[n, i, b"x" * (n * 1000)] for i in range(50)]


def test_slow_call_does_not_block_others(client: RpcClient, handler: Recorder) -> None:
    t = threading.Thread(target=client.call, args=("block",))
    t.start()
    assert handler.entered.wait(5)
    start = time.monotonic()
    assert client.call("echo", 1) == 1
    assert time.monotonic() - start < 1.0
    handler.release.set()
    t.join()


def test_remote_exception_comes_back_as_remote_error(client: RpcClient) -> None:
    with pytest.raises(RemoteError) as info:
        client.call("boom")
    assert info.value.type_name == "KeyError"
    assert "no such partition: 7" in info.value.message
    assert "Traceback" not in str(info.value)
    with pytest.raises(RemoteError, match="unknown method 'nope'") as info2:
        client.call("nope")
    assert info2.value.type_name == "ValueError"
    assert client.call("echo", "still fine") == "still fine"


def test_call_timeout(client: RpcClient) -> None:
    with pytest.raises(RpcTimeout):
        client.call("sleep", 0.5, timeout=0.1)
    assert client.call("echo", 2) == 2  # the late answer is dropped; connection still usable


def test_wrong_secret_rejected_on_both_sides(server: RpcServer, handler: Recorder) -> None:
    with (
        RpcClient(server.address, secret=b"wrong") as bad,
        pytest.raises(AuthError, match="same RPC secret"),
    ):
        bad.call("echo", 1)
    # the server dropped the raw peer too: a hand-made handshake with the wrong key
    with pytest.raises((EOFError, ConnectionResetError)):
        _raw_authenticated(server.address, secret=b"wrong").close()
    assert handler.calls == []


def test_client_rejects_server_that_cannot_prove_the_secret() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def impostor() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(_frame(b"DSR1" + os.urandom(32)))
            _read_exact(conn, 4 + 64)
            conn.sendall(_frame(os.urandom(32)))  # a proof made without the secret
            _closed_by_peer(conn, 5)

    t = threading.Thread(target=impostor)
    t.start()
    try:
        with (
            RpcClient(listener.getsockname(), secret=SECRET) as c,
            pytest.raises(AuthError, match="failed to prove"),
        ):
            c.call("echo", 1)
    finally:
        t.join()
        listener.close()


def test_empty_secret_refused_unless_insecure_is_explicit(handler: Recorder) -> None:
    with pytest.raises(ConfigError, match="secret is empty"):
        RpcServer(handler, secret=b"")
    with pytest.raises(ConfigError, match="secret is empty"):
        RpcClient(("127.0.0.1", 1), secret=b"")
    with RpcServer(handler, secret=b"", allow_insecure=True) as srv:
        host, port = srv.address
        with RpcClient(f"{host}:{port}", secret=b"", allow_insecure=True) as c:
            assert c.call("echo", 3) == 3


def test_server_drops_oversize_frame_before_reading_it(handler: Recorder) -> None:
    with RpcServer(handler, secret=SECRET, max_frame=1 << 20) as srv:
        sock = _raw_authenticated(srv.address)
        with sock:
            sock.sendall(struct.pack(">I", (1 << 20) + 1))  # the body never comes
            assert _closed_by_peer(sock, 2.0)
        with RpcClient(srv.address, secret=SECRET) as c:  # others are unaffected
            assert c.call("echo", 4) == 4
    assert handler.calls == ["echo"]


def test_client_refuses_to_send_oversize_params(handler: Recorder) -> None:
    with (
        RpcServer(handler, secret=SECRET, max_frame=1 << 20) as srv,
        RpcClient(srv.address, secret=SECRET, max_frame=1 << 20) as c,
    ):
        with pytest.raises(FrameTooLarge) as info:
            c.call("echo", b"x" * (1 << 20))
        assert info.value.limit == 1 << 20
        assert info.value.size > 1 << 20
        assert c.call("echo", 5) == 5
    assert handler.calls == ["echo"]


def test_oversize_result_comes_back_as_error(handler: Recorder) -> None:
    with (
        RpcServer(handler, secret=SECRET, max_frame=1 << 20) as srv,
        RpcClient(srv.address, secret=SECRET, max_frame=4 << 20) as c,
        pytest.raises(RemoteError) as info,
    ):
        c.call("big", 2 << 20)
    assert info.value.type_name == "FrameTooLarge"
    assert "exceeds the limit of 1048576" in info.value.message


@pytest.mark.parametrize("garbage", [b"", b"GET / HTTP/1.1\r\n\r\n", struct.pack(">I", 1 << 30)])
def test_unauthenticated_peer_is_dropped_within_handshake_timeout(
    server: RpcServer, handler: Recorder, garbage: bytes
) -> None:
    with socket.create_connection(server.address, timeout=5) as sock:
        start = time.monotonic()
        if garbage:
            sock.sendall(garbage)
        assert _closed_by_peer(sock, 3.0)
        assert time.monotonic() - start < 2.0  # handshake_timeout is 0.5 s here
    assert handler.calls == []


def test_server_notifications_reach_on_notify(server: RpcServer) -> None:
    got: list[tuple[str, Any]] = []
    done = threading.Event()

    def on_notify(method: str, params: Any) -> None:
        got.append((method, params))
        if len(got) == 3:
            done.set()

    with RpcClient(server.address, secret=SECRET, on_notify=on_notify) as c:
        assert c.call("push", 3) == "pushed"
        assert done.wait(5)
    assert got == [("tick", {"i": i, "blob": b"\x00\x01"}) for i in range(3)]


def test_client_notifications_reach_the_handler(client: RpcClient, handler: Recorder) -> None:
    client.notify("echo", {"fire": "and forget"})
    deadline = time.monotonic() + 5
    while "echo" not in handler.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.calls == ["echo"]


def test_server_stop_fails_pending_calls_quickly(handler: Recorder) -> None:
    srv = RpcServer(handler, secret=SECRET).start()
    failures: list[tuple[BaseException, float]] = []

    def pending_call(c: RpcClient) -> None:
        try:
            c.call("block", timeout=30)
        except BaseException as exc:
            failures.append((exc, time.monotonic()))

    with RpcClient(srv.address, secret=SECRET) as c:
        threads = [threading.Thread(target=pending_call, args=(c,)) for _ in range(3)]
        for t in threads:
            t.start()
        assert handler.entered.wait(5)
        time.sleep(0.1)
        stopper = threading.Thread(target=srv.stop)
        stopped_at = time.monotonic()
        stopper.start()  # stop() waits for the blocked handlers; the calls must not
        for t in threads:
            t.join(5)
        handler.release.set()
        stopper.join()
        assert len(failures) == 3
        for exc, at in failures:
            assert isinstance(exc, ConnectionLost)
            assert at - stopped_at < 1.0
        with pytest.raises(ConnectionLost, match="cannot connect"):
            c.call("echo", 1)
    srv.stop()  # idempotent


def test_client_reconnects_after_server_restart_on_same_port(handler: Recorder) -> None:
    srv = RpcServer(handler, secret=SECRET).start()
    host, port = srv.address
    with RpcClient((host, port), secret=SECRET) as c:
        assert c.call("echo", "before") == "before"
        srv.stop()
        with pytest.raises(ConnectionLost):
            c.call("echo", "during", timeout=5)
        srv = RpcServer(handler, secret=SECRET, host=host, port=port).start()
        try:
            assert c.call("echo", "after") == "after"
            assert not c.closed
        finally:
            srv.stop()
    assert c.closed
    with pytest.raises(ConnectionLost, match="closed"):
        c.call("echo", 1)


def _self_signed(tmp: Path) -> tuple[str, str]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dstream-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_tls_round_trip(tmp_path: Path, handler: Recorder) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx, client_ctx = rpc.make_ssl_contexts(cert, key, cert)
    with (
        RpcServer(handler, secret=SECRET, ssl_context=server_ctx) as srv,
        RpcClient(srv.address, secret=SECRET, ssl_context=client_ctx) as c,
    ):
        blob = os.urandom(3 * 1024 * 1024)
        assert c.call("echo", {"blob": blob, "n": [1, 2]}) == {"blob": blob, "n": [1, 2]}
        # a plaintext client cannot talk to a TLS server
        with (
            RpcClient(srv.address, secret=SECRET, handshake_timeout=0.5) as plain,
            pytest.raises(AuthError, match="did not greet"),
        ):
            plain.call("echo", 1)
    assert handler.calls == ["echo"]


def test_tls_concurrent_calls_share_one_connection(tmp_path: Path, handler: Recorder) -> None:
    # ssl.SSLSocket corrupts records when one thread reads while others write; this
    # workload broke that design within a few hundred calls.
    cert, key = _self_signed(tmp_path)
    server_ctx, client_ctx = rpc.make_ssl_contexts(cert, key, cert)
    errors: list[BaseException] = []
    with (
        RpcServer(handler, secret=SECRET, ssl_context=server_ctx) as srv,
        RpcClient(srv.address, secret=SECRET, ssl_context=client_ctx) as c,
    ):

        def worker(n: int) -> None:
            try:
                for i in range(400):
                    assert c.call("echo", [n, i, b"z" * (i % 7) * 300]) == [
                        n, i, b"z" * (i % 7) * 300
                    ]  # fmt: skip
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_tls_rejects_peer_from_another_ca(tmp_path: Path, handler: Recorder) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert_a, key_a = _self_signed(tmp_path / "a")
    cert_b, key_b = _self_signed(tmp_path / "b")
    server_ctx, _ = rpc.make_ssl_contexts(cert_a, key_a, cert_a)
    _, client_ctx = rpc.make_ssl_contexts(cert_b, key_b, cert_b)
    with (
        RpcServer(handler, secret=SECRET, ssl_context=server_ctx) as srv,
        RpcClient(srv.address, secret=SECRET, ssl_context=client_ctx) as c,
        pytest.raises(AuthError, match="TLS peer verification"),
    ):
        c.call("echo", 1)
    assert handler.calls == []


def test_connect_helper_raises_early() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionLost, match="cannot connect"):
        rpc.connect(("127.0.0.1", port), secret=SECRET, connect_timeout=1)


def test_no_pickle_anywhere_in_the_transport() -> None:
    tree = ast.parse(Path(rpc.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import)
        for alias in n.names
    }
    imported |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    forbidden = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve"}
    assert imported.isdisjoint(forbidden)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert names.isdisjoint(forbidden | {"loads", "__reduce__", "__import__"})
    assert "msgpack" in imported
