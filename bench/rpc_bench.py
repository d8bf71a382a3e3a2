"""RPC transport throughput, plain and with mutual TLS: the cost of TLS on block transfers.

Run: ``.venv/bin/python bench/rpc_bench.py [--seconds 3] [--rounds 2]
[--mode both|plain|tls] [--out bench/results/rpc.md]``.

The server and the client are built by the fleet's own factories
(``ops.services.rpc_server`` / ``rpc_client``) from settings, so the TLS mode runs exactly
the fleet's code path: ``ops.tls.MutualTls`` contexts (TLS 1.2+, client certificate
required), the ``_TlsConn`` memory-BIO transport, and the shared-secret handshake inside
TLS. The server runs in a child process (as in the fleet: two processes, loopback TCP), so
the figures are not skewed by sharing one GIL between client and server.

Measured per mode: small-call round trips/s (1 and 8 threads), and MB/s of block transfers
(``put``: a block up, a small ack back, as replication does; ``get``: a small request, a
block back, as a shuffle fetch does) for 4 MiB and 256 KiB blocks. The modes alternate
for ``--rounds`` rounds and each figure is the best round, so that a burst of load from
other processes on the machine skews both modes alike rather than one.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ops.config import Settings
from ops.rpc import Peer
from ops.services import rpc_client, rpc_server

SECRET = "bench-secret"
BLOB = 4 * 1024 * 1024
SMALL_BLOB = 256 * 1024
_BLOCKS = {BLOB: os.urandom(BLOB), SMALL_BLOB: os.urandom(SMALL_BLOB)}


def _handler(method: str, params: Any, peer: Peer) -> Any:
    if method == "ping":
        return params
    if method == "put":  # worker -> worker replication: bytes up, small ack back
        return len(params)
    if method == "get":  # shuffle fetch: small request, bytes back
        return _BLOCKS[params]
    raise ValueError(method)


def _settings(tls: tuple[str, str, str] | None) -> Settings:
    cert, key, ca = tls or ("", "", "")
    return Settings(secret=SECRET, tls_cert=cert, tls_key=key, tls_ca=ca)


def _serve(q: Any, tls: tuple[str, str, str] | None) -> None:
    srv = rpc_server(_settings(tls), _handler, port=0, name="bench", host="127.0.0.1")
    srv.start()
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


def _tls_files(tmp: Path) -> tuple[str, str, str]:
    """A CA and a certificate it signed (P-256, as cert-manager issues by default)."""

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    ca_key, ca, key, csr, cert = (tmp / n for n in ("ca.key", "ca.pem", "k.pem", "c.csr", "c.pem"))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "1",
        "-subj",
        "/CN=bench-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    )
    openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=bench")
    ext = tmp / "ext.cnf"
    ext.write_text("extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-out", cert, "-days", "1", "-extfile", ext)  # fmt: skip
    return str(cert), str(key), str(ca)


def measure(seconds: float, tls: tuple[str, str, str] | None) -> dict[str, float]:
    """One mode's figures; the server runs in a spawned child process."""
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(q, tls))
    proc.start()
    try:
        host, port = q.get(timeout=30)
        out: dict[str, float] = {}
        with rpc_client(_settings(tls), f"{host}:{port}") as c:
            small = {"task": "t-1", "batch": 1700000000000, "partition": 3}
            c.call("ping", small)
            out["small calls, 1 thread (round trips/s)"] = _rate(
                lambda: c.call("ping", small), seconds
            )
            out["small calls, 8 threads (round trips/s)"] = _rate(
                lambda: c.call("ping", small), seconds, threads=8
            )
            for size, label in ((BLOB, "4 MiB"), (SMALL_BLOB, "256 KiB")):
                blob = _BLOCKS[size]
                mb = size / 1e6
                out[f"{label} put, upload (MB/s)"] = (
                    _rate(lambda b=blob: c.call("put", b), seconds) * mb
                )
                out[f"{label} get, fetch (MB/s)"] = (
                    _rate(lambda s=size: c.call("get", s), seconds) * mb
                )
                out[f"{label} get, 4 threads (MB/s)"] = (
                    _rate(lambda s=size: c.call("get", s), seconds, threads=4) * mb
                )
    finally:
        q.put("stop")
        proc.join(30)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=3.0, help="per figure (default 3)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; best kept")
    ap.add_argument("--mode", choices=("both", "plain", "tls"), default="both")
    ap.add_argument("--tls", action="store_true", help="same as --mode tls")
    ap.add_argument("--out", help="also write the table as markdown to this file")
    args = ap.parse_args(argv)
    mode = "tls" if args.tls else args.mode
    machine = f"machine: {_cpu()}, {os.cpu_count()} CPUs, {platform.platform()}"
    setup = (
        f"python {platform.python_version()}, loopback TCP, server in a child process, "
        f"{args.seconds:g} s per figure, best of {args.rounds} alternating rounds; "
        f"TLS: mutual, {_tls_version()}, "
        "P-256 certificates, the fleet's factories"
    )
    print(machine)
    print(setup)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = _tls_files(Path(tmp))
        plan = [("plain", None)] * (mode != "tls") + [("mTLS", files)] * (mode != "plain")
        for _ in range(max(1, args.rounds)):
            for name, tls in plan:
                got = measure(args.seconds, tls)
                best = results.setdefault(name, got)
                for figure, value in got.items():
                    best[figure] = max(best[figure], value)
    modes = list(results)
    rows = list(next(iter(results.values())))
    header = ["figure", *modes] + (["mTLS / plain"] if len(modes) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row, *(f"{results[m][row]:,.0f}" for m in modes)]
        if len(modes) == 2:
            cells.append(f"{results['mTLS'][row] / results['plain'][row]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = "python bench/rpc_bench.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        Path(args.out).write_text(
            f"## RPC transport: the cost of mutual TLS\n\n{machine}  \n{setup}  \n"
            f"command: `{command.strip()}`\n\n{table}\n"
        )
    return 0


def _tls_version() -> str:
    import ssl

    return ssl.OPENSSL_VERSION


if __name__ == "__main__":
    sys.exit(main())
