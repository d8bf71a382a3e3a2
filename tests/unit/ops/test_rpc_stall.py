"""A call's timeout bounds its send and its connect too: a peer that stopped reading
(SIGSTOP of a real server process) fails the call in about that time, not after the
socket's IO timeout (60 s) or the handshake timeout (5 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from engine.errors import RpcError
from ops.rpc import CONNECT_FLOOR_S, IO_TIMEOUT, RpcClient, RpcTimeout

SECRET = b"stall-test-secret-0123456789abcdef"
SERVER = """
import sys, time
from ops.rpc import RpcServer
srv = RpcServer(lambda method, params, peer: len(params) if method == "put" else "pong",
                secret=sys.argv[1].encode()).start()
print(srv.address[1], flush=True)
time.sleep(600)
"""


@pytest.fixture
def paused_server() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, SECRET.decode()],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield port, proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_send_to_a_paused_peer_is_bounded_by_the_call_timeout(paused_server) -> None:
    port, proc = paused_server
    big = b"x" * (32 * 1024 * 1024)  # more than the socket buffers take
    with RpcClient(("127.0.0.1", port), secret=SECRET) as client:
        assert client.call("put", big[:1000], timeout=5) == 1000  # connected, answering
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RpcTimeout, match=r"stalled|no answer"):
            client.call("put", big, timeout=0.5)
        took = time.monotonic() - t0
        # the send stalls once the buffers are full: cut 0.5 s later (plus the answer wait
        # if the buffers did take it all); before, it blocked for IO_TIMEOUT
        assert took < 3.0 < IO_TIMEOUT, took
        os.kill(proc.pid, signal.SIGCONT)
        # the connection was dropped (the frame was cut short): the next call reconnects
        assert client.call("ping", None, timeout=5) == "pong"


def test_connecting_to_a_paused_peer_is_bounded_by_the_call_timeout(paused_server) -> None:
    port, proc = paused_server
    os.kill(proc.pid, signal.SIGSTOP)
    with RpcClient(("127.0.0.1", port), secret=SECRET) as client:
        t0 = time.monotonic()
        with pytest.raises(RpcError):
            client.call("ping", None, timeout=0.3)  # the kernel accepts; no greeting comes
        took = time.monotonic() - t0
        # at least CONNECT_FLOOR_S (a slow TLS handshake), not the 5 s handshake timeout
        assert CONNECT_FLOOR_S - 0.05 <= took < CONNECT_FLOOR_S + 1.5, took
