"""A call's timeout bounds its send and its connect too: a peer that stopped reading
(SIGSTOP of a real server process) fails the call in about that time, not after the
socket's IO timeout (60 s) or the handshake timeout (5 s). And a server's answer to a
caller that stopped reading (a SIGSTOPped client process) gives up its handler thread
after ``RESPONSE_STALL_S``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.errors import RpcError
from ops.rpc import (
    CONNECT_FLOOR_S,
    IO_TIMEOUT,
    RESPONSE_STALL_S,
    RpcClient,
    RpcServer,
    RpcTimeout,
)

SECRET = b"stall-test-secret-0123456789abcdef"
SERVER = """
import sys, time
from ops.rpc import RpcServer
srv = RpcServer(lambda method, params, peer: len(params) if method == "put" else "pong",
                secret=sys.argv[1].encode()).start()
print(srv.address[1], flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def _python(script: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run *script* in another Python process; its first line of output, then its end.

    The process may be SIGSTOPped meanwhile: it is continued before it is killed.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", script, SECRET.decode(), *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline().strip()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def paused_server() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    with _python(SERVER) as (proc, port):
        yield int(port), proc


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


CLIENT = """
import sys
from ops.rpc import RpcClient
with RpcClient(("127.0.0.1", int(sys.argv[2])), secret=sys.argv[1].encode()) as c:
    print("connected", flush=True)
    c.call("big", None, timeout=600)
"""


def test_an_answer_to_a_paused_caller_frees_its_handler_thread() -> None:
    """One handler thread, held by a large answer to a caller that stopped reading.

    Another caller's ping is answered once the stalled answer is cut; before, the thread
    stayed blocked for ``IO_TIMEOUT`` and the ping timed out.
    """
    entered, go = threading.Event(), threading.Event()

    def handler(method: str, params: Any, peer: Any) -> Any:
        if method == "big":
            entered.set()
            go.wait(30)
            return b"x" * (32 * 1024 * 1024)  # more than the socket buffers take
        return "pong"

    with (
        RpcServer(handler, secret=SECRET, handler_threads=1) as srv,
        _python(CLIENT, str(srv.address[1])) as (proc, first),
    ):
        assert first == "connected"
        assert entered.wait(10), "the big call did not reach the server"
        os.kill(proc.pid, signal.SIGSTOP)
        go.set()  # the answer now fills the buffers of a caller that does not read
        time.sleep(0.2)
        with RpcClient(("127.0.0.1", srv.address[1]), secret=SECRET) as other:
            t0 = time.monotonic()
            assert other.call("ping", None, timeout=10) == "pong"
            took = time.monotonic() - t0
        assert took < RESPONSE_STALL_S + 2.0 < IO_TIMEOUT, took
