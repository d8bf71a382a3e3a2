"""RPC transport throughput: small-call round trips/s and MB/s for 4 MB payloads.

Run: ``.venv/bin/python bench/rpc_bench.py [--seconds 3] [--tls]``. The server runs in a
child process (as in the fleet: two processes, loopback TCP), so the figures are not
skewed by sharing one GIL between client and server.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops.rpc import Peer, RpcClient, RpcServer, make_ssl_contexts

SECRET = b"bench-secret"
BLOB = 4 * 1024 * 1024


def _handler(method: str, params: Any, peer: Peer) -> Any:
    if method == "ping":
        return params
    if method == "put":  # worker -> worker replication: bytes up, small ack back
        return len(params)
    if method == "get":  # shuffle fetch: small request, bytes back
        return _BLOCK
    raise ValueError(method)


_BLOCK = os.urandom(BLOB)


def _serve(q: Any, tls: tuple[str, str] | None) -> None:
    ctx = make_ssl_contexts(tls[0], tls[1], tls[0])[0] if tls else None
    srv = RpcServer(_handler, secret=SECRET, ssl_context=ctx).start()
    q.put(srv.address)
    q.get()  # wait for "stop"
    srv.stop()


def _rate(fn: Any, seconds: float, threads: int = 1) -> float:
    """Calls of *fn* per second, run from *threads* threads for about *seconds*."""
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            fn()
            counts[i] += 1

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    start = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.monotonic() - start)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _tls_files(tmp: Path) -> tuple[str, str]:
    import subprocess

    cert, key = tmp / "c.pem", tmp / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=bench",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--tls", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tls = _tls_files(Path(tmp)) if args.tls else None
        q: Any = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_serve, args=(q, tls))
        proc.start()
        address = q.get(timeout=30)
        ctx = make_ssl_contexts(tls[0], tls[1], tls[0])[1] if tls else None
        print(f"machine: {_cpu()}, {os.cpu_count()} CPUs, {platform.platform()}")
        print(f"python {platform.python_version()}, tls={bool(tls)}, loopback, server in a child")
        with RpcClient(address, secret=SECRET, ssl_context=ctx) as c:
            small = {"task": "t-1", "batch": 1700000000000, "partition": 3}
            c.call("ping", small)
            rt1 = _rate(lambda: c.call("ping", small), args.seconds)
            rt8 = _rate(lambda: c.call("ping", small), args.seconds, threads=8)
            blob = os.urandom(BLOB)
            put = _rate(lambda: c.call("put", blob), args.seconds) * BLOB / 1e6
            get = _rate(lambda: c.call("get"), args.seconds) * BLOB / 1e6
            get4 = _rate(lambda: c.call("get"), args.seconds, threads=4) * BLOB / 1e6
        q.put("stop")
        proc.join()
    print(f"small calls, 1 thread : {rt1:10.0f} round trips/s")
    print(f"small calls, 8 threads: {rt8:10.0f} round trips/s")
    print(f"4 MB put (upload)     : {put:10.0f} MB/s")
    print(f"4 MB get (fetch)      : {get:10.0f} MB/s")
    print(f"4 MB get, 4 threads   : {get4:10.0f} MB/s")


if __name__ == "__main__":
    main()
