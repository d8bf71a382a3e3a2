"""The cluster DNS of the deployment test: a tiny authoritative server for ``cluster.local``.

It stands in for CoreDNS: the emulator (:mod:`tests.deploy.kube`) sets its records from its
endpoints table (a Service name -> the addresses of its ready pods; a headless Service's
per-pod names), and pods reach it through ``--dns`` with Kubernetes' search path, so
``<svc>.<ns>.svc`` resolves exactly as in a cluster. A record changes the moment the
endpoints do; nothing caches (TTL 0), so a pod that stops being ready stops being returned
at once — the behaviour the issue asks of network aliases, without disconnecting the pod
from its network (which would drop its connections and could change its address).

Only A queries get answers; AAAA for a known name is an empty NOERROR (the pods have IPv4
only), anything else is NXDOMAIN. Names outside the table are NXDOMAIN: pods resolve
nothing outside the cluster (Kafka and Redis are passed as addresses).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Mapping, Sequence

#: Query types answered.
TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
RCODE_OK, RCODE_FORMERR, RCODE_NXDOMAIN = 0, 1, 3


def parse_query(packet: bytes) -> tuple[int, int, str, int, int]:
    """Return ``(id, flags, name, qtype, end)`` of a one-question query.

    ``end`` is the offset just past the question. Raises ValueError for anything else
    (compressed names do not occur in questions).
    """
    if len(packet) < 12:
        raise ValueError("short packet")
    qid, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if qdcount != 1:
        raise ValueError("one question expected")
    labels: list[str] = []
    pos = 12
    while True:
        if pos >= len(packet):
            raise ValueError("truncated name")
        n = packet[pos]
        pos += 1
        if n == 0:
            break
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(packet[pos : pos + n].decode("ascii", "replace"))
        pos += n
    if pos + 4 > len(packet):
        raise ValueError("truncated question")
    qtype, _qclass = struct.unpack("!HH", packet[pos : pos + 4])
    return qid, flags, ".".join(labels).lower(), qtype, pos + 4


def answer(packet: bytes, records: Mapping[str, Sequence[str]]) -> bytes:
    """The response to *packet* given *records* (lower-case FQDN without dot -> IPv4s)."""
    try:
        qid, flags, name, qtype, end = parse_query(packet)
    except ValueError:
        qid = struct.unpack("!H", packet[:2])[0] if len(packet) >= 2 else 0
        return struct.pack("!HHHHHH", qid, 0x8000 | RCODE_FORMERR, 0, 0, 0, 0)
    question = packet[12:end]
    addrs = records.get(name.rstrip("."))
    rcode = RCODE_OK if addrs is not None else RCODE_NXDOMAIN
    rrs = b""
    count = 0
    if addrs and qtype == TYPE_A:
        for ip in addrs:
            rrs += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 0, 4)
            rrs += ipaddress.IPv4Address(ip).packed
            count += 1
    # QR, opcode copied, AA, RD copied, RA
    out_flags = 0x8000 | (flags & 0x7800) | 0x0400 | (flags & 0x0100) | 0x0080 | rcode
    return struct.pack("!HHHHHH", qid, out_flags, 1, count, 0, 0) + question + rrs


class ClusterDns:
    """A UDP DNS server on ``(host, port)`` answering from a replaceable table.

    Start with :meth:`start`, replace the whole table with :meth:`set_records` (atomic:
    a query sees the old table or the new one), stop with :meth:`close` (idempotent).
    """

    def __init__(self, host: str, port: int = 53) -> None:
        self.host, self.port = host, port
        self._records: dict[str, tuple[str, ...]] = {}
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cluster-dns", daemon=True)
        self.queries = 0

    def start(self) -> ClusterDns:
        self._thread.start()
        return self

    def set_records(self, records: Mapping[str, Sequence[str]]) -> None:
        self._records = {k.lower().rstrip("."): tuple(v) for k, v in records.items()}

    def records(self) -> dict[str, tuple[str, ...]]:
        return dict(self._records)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            with contextlib.suppress(OSError):
                self._sock.sendto(answer(packet, self._records), peer)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self._sock.close()
