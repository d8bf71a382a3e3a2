"""Network-partition harness: every role in its own Linux network namespace.

Layout (one :class:`Network` per test module)::

    root namespace: bridge ``dsp<tag>`` at 10.<a>.<b>.1/24 -- Kafka and Redis listen here,
                    and so does the test process (producer, reader, status polls)
    namespace ``dsp<tag>-<name>``: veth ``eth0`` at 10.<a>.<b>.<10+i>/24, one role's process

A :meth:`Network.cut` drops packets (``DROP``, never ``REJECT``: the sender learns nothing,
as in a real partition) at the *receiving* end of both directions, in the INPUT chain of
each side: inside a node's namespace, or, for the root namespace, in a chain of its own
(``DSP<tag>``) jumped to from INPUT. Dropping on input rather than output keeps the
sender's ``connect``/``send`` from failing with ``EPERM`` (what a local OUTPUT drop
returns), which no real network does. :meth:`Network.heal` deletes exactly the rules of a
cut. Established TCP connections survive a cut (the kernel keeps retransmitting), so
healing resumes them, as on a real network.

Cleanup always runs (:meth:`Network.close`, also from ``atexit``): processes started in
the namespaces are stopped first, then the namespaces (their veths and rules go with
them), the bridge and the root chain. :func:`sweep_stale` removes what a killed test run
left behind (names with the ``dsp`` prefix whose owner pid is gone).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "dsp"
#: Where the live networks note their owner's pid, so a later run can sweep leftovers.
_OWNERS = Path("/run/dstream-netns")


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        msg = f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}"
        raise RuntimeError(msg)
    return proc


def unavailable() -> str | None:
    """Why this machine cannot run the partition tests, or None when it can.

    Needs root, ``ip`` (iproute2) and ``iptables``, and the right to create a namespace,
    a bridge and a rule inside a namespace (a container without CAP_NET_ADMIN has none).
    """
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 iptables)"
    probe = f"{PREFIX}probe{os.getpid() % 10000}"
    try:
        _run("ip", "netns", "add", probe)
        try:
            _run(
                "ip",
                "netns",
                "exec",
                probe,
                "iptables",
                "-A",
                "INPUT",
                "-s",
                "10.0.0.1",
                "-j",
                "DROP",
            )
            _run("ip", "link", "add", probe, "type", "bridge")
            _run("ip", "link", "del", probe)
        finally:
            _run("ip", "netns", "del", probe, check=False)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create network namespaces, bridges or rules here: {e}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Remove namespaces, bridges and root chains of earlier runs whose process is gone."""
    if not _OWNERS.is_dir():
        return
    for note in _OWNERS.glob(f"{PREFIX}*"):
        try:
            pid = int(note.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and _pid_alive(pid):
            continue
        _teardown(note.name)
        note.unlink(missing_ok=True)


def _teardown(tag: str) -> None:
    """Best effort: everything named after *tag* goes (namespaces, bridge, root chain)."""
    listed = _run("ip", "netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ")[0]
        if name.startswith(f"{tag}-"):
            for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _run("ip", "netns", "del", name, check=False)
    _run("ip", "link", "del", tag, check=False)
    chain = tag.upper()
    while _run("iptables", "-D", "INPUT", "-j", chain, check=False).returncode == 0:
        pass
    _run("iptables", "-F", chain, check=False)
    _run("iptables", "-X", chain, check=False)


@dataclass(frozen=True)
class Node:
    """One namespace on the bridge: its name and address."""

    ns: str
    ip: str

    def cmd(self, *argv: str) -> list[str]:
        """*argv* run inside this namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns, *argv]


@dataclass
class Cut:
    """The rules of one cut: (namespace or None for the root chain, rule spec) pairs."""

    what: str
    rules: list[tuple[str | None, list[str]]] = field(default_factory=list)
    at: float = 0.0


class Network:
    """A bridge in the root namespace and one namespace per role, always cleaned up.

    Names carry a tag made of the owner's pid (``dsp<pid>``), so concurrent test sessions
    do not collide; the subnet is a free 10.x.y.0/24.
    """

    def __init__(self) -> None:
        sweep_stale()
        self.tag = f"{PREFIX}{os.getpid() % 100000:05d}"[:8]
        self.chain = self.tag.upper()
        self.nodes: dict[str, Node] = {}
        self.cuts: list[Cut] = []
        self._procs: list[Any] = []
        self._closed = False
        self.subnet = self._free_subnet()
        self.host_ip = f"{self.subnet}.1"
        _OWNERS.mkdir(parents=True, exist_ok=True)
        (_OWNERS / self.tag).write_text(f"{os.getpid()}\n")
        atexit.register(self.close)
        try:
            _run("ip", "link", "add", self.tag, "type", "bridge")
            _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.tag)
            _run("ip", "link", "set", self.tag, "up")
            _run("iptables", "-N", self.chain)
            _run("iptables", "-I", "INPUT", "-j", self.chain)
        except Exception:
            self.close()
            raise

    @staticmethod
    def _free_subnet() -> str:
        used = _run("ip", "-4", "addr", check=False).stdout + _run("ip", "-4", "route").stdout
        rng = random.Random()
        for _ in range(200):
            cand = f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}"
            if f"{cand}." not in used:
                return cand
        msg = "no free 10.x.y.0/24 subnet for the test bridge"
        raise RuntimeError(msg)

    def add(self, name: str) -> Node:
        """A new namespace *name* with a veth on the bridge; returns its node."""
        i = len(self.nodes)
        ns = f"{self.tag}-{name}"
        node = Node(ns, f"{self.subnet}.{10 + i}")
        host_end, ns_end = f"{self.tag}h{i}", f"{self.tag}n{i}"
        _run("ip", "netns", "add", ns)
        self.nodes[name] = node
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _run("ip", "link", "set", host_end, "master", self.tag)
        _run("ip", "link", "set", host_end, "up")
        _run("ip", "link", "set", ns_end, "netns", ns)
        _run("ip", "-n", ns, "link", "set", ns_end, "name", "eth0")
        _run("ip", "-n", ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return node

    def track(self, proc: Any) -> Any:
        """Stop *proc* (anything with ``stop()``) at :meth:`close`, before its namespace goes."""
        self._procs.append(proc)
        return proc

    # -- partitions ---------------------------------------------------------------------
    def _drop_from(
        self, at: Node | None, src: str, port: int | None, sport: bool
    ) -> tuple[str | None, list[str]]:
        spec = ["-s", src]
        if port is not None:
            spec += ["-p", "tcp", "--sport" if sport else "--dport", str(port)]
        spec += ["-j", "DROP"]
        return (None if at is None else at.ns, spec)

    def cut(self, a: Node, b: Node | None, port: int | None = None, what: str = "") -> Cut:
        """Drop every packet between *a* and *b* (None: the root namespace, the services).

        With *port*, only TCP traffic to and from that port on *b*'s side (Redis, Kafka)
        is cut. Returns the cut, for :meth:`heal`.
        """
        b_ip = self.host_ip if b is None else b.ip
        c = Cut(what or f"{a.ns} x {b.ns if b else 'services'}")
        # a no longer hears b (from b's port), b no longer hears a (to b's port)
        c.rules.append(self._drop_from(a, b_ip, port, sport=True))
        c.rules.append(self._drop_from(b, a.ip, port, sport=False))
        for ns, spec in c.rules:
            self._iptables(ns, "-I", spec)
        c.at = time.monotonic()
        self.cuts.append(c)
        return c

    def heal(self, c: Cut) -> float:
        """Delete exactly the rules of *c*; returns the monotonic time of the heal."""
        for ns, spec in c.rules:
            self._iptables(ns, "-D", spec)
        self.cuts.remove(c)
        return time.monotonic()

    def _iptables(self, ns: str | None, op: str, spec: list[str]) -> None:
        if ns is None:
            _run("iptables", op, self.chain, *spec)
        else:
            _run("ip", "netns", "exec", ns, "iptables", op, "INPUT", *spec)

    def close(self) -> None:
        """Stop tracked processes, then remove namespaces, bridge and rules. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in reversed(self._procs):
            with contextlib.suppress(Exception):
                p.stop()
        _teardown(self.tag)
        (_OWNERS / self.tag).unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


@contextlib.contextmanager
def network() -> Iterator[Network]:
    """A :class:`Network`, closed on exit whatever happened."""
    net = Network()
    try:
        yield net
    finally:
        net.close()
