"""Podman for the deployment test: one command prefix, rlimits, and the pods' network.

Podman runs with ``--runtime runc --cgroup-manager=cgroupfs`` (crun refuses this machine's
hybrid cgroup layout) and netavark, and every container gets explicit ``--ulimit`` values
at or below the host's soft limits (the machine cannot raise rlimits, and runc fails to
start a container whose limits it cannot set).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
from dataclasses import dataclass, field

#: Global podman options every call uses (see the module docstring).
PODMAN = (
    "podman",
    "--runtime",
    "runc",
    "--cgroup-manager=cgroupfs",
    "--network-backend",
    "netavark",
)
#: Every container and network this module creates carries this label and the creating
#: process's pid, so a crashed run's leftovers can be found and removed without touching
#: anything else (not even a deployment test running at the same time).
LABEL = "dstream-deploy"
OWNER = f"{LABEL}.owner"
#: runc was refused nproc=50000 under a host limit of 96365 here; 16384 is plenty.
RLIMIT_CAP = 16384


def podman(
    *args: str, check: bool = True, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``podman <global options> *args``; raise with its output when *check* and it fails."""
    proc = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and proc.returncode != 0:
        msg = f"podman {' '.join(args[:3])}... exit {proc.returncode}: {proc.stderr.strip()}"
        raise RuntimeError(msg)
    return proc


def rlimit_args() -> list[str]:
    """``--ulimit`` options at or below the host's soft limits (capped at RLIMIT_CAP)."""
    out = []
    for name, res in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, _hard = resource.getrlimit(res)
        n = RLIMIT_CAP if soft == resource.RLIM_INFINITY else min(soft, RLIMIT_CAP)
        out += ["--ulimit", f"{name}={n}:{n}"]
    return out


def labels() -> list[str]:
    """``--label`` options for a container or network this process creates."""
    return ["--label", LABEL, "--label", f"{OWNER}={os.getpid()}"]


def _alive(pid: str) -> bool:
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")


def remove_leftovers() -> None:
    """Remove the containers and networks of earlier runs whose process is gone."""
    fmt = '{{.ID}} {{index .Labels "%s"}}' % OWNER  # noqa: UP031 (Go template braces)
    rows = podman("ps", "-a", "--filter", f"label={LABEL}", "--format", fmt, check=False)
    dead = [
        c for c, _, pid in (r.partition(" ") for r in rows.stdout.splitlines()) if not _alive(pid)
    ]
    if dead:
        podman("rm", "-f", "-t", "0", *dead, check=False)
    fmt = '{{.Name}} {{index .Labels "%s"}}' % OWNER  # noqa: UP031
    rows = podman("network", "ls", "--filter", f"label={LABEL}", "--format", fmt, check=False)
    for name, _, pid in (r.partition(" ") for r in rows.stdout.splitlines()):
        if not _alive(pid):
            podman("network", "rm", "-f", name, check=False)


@dataclass
class PodNetwork:
    """One podman network for every pod, with a holder container that keeps its bridge up.

    The holder lets the host bind Kafka, Redis and the cluster DNS to the gateway address
    (the host's own address on the bridge) before the first pod starts. Addresses are
    handed out by :meth:`allocate` so a pod knows its IP before its container starts, as a
    CNI reports it before the kubelet starts the containers.
    """

    name: str
    image: str
    subnet: str = ""
    gateway: str = ""
    _free: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self) -> PodNetwork:
        podman("network", "create", "--disable-dns", *labels(), self.name)
        info = json.loads(podman("network", "inspect", self.name).stdout)[0]
        self.subnet = info["subnets"][0]["subnet"]
        self.gateway = info["subnets"][0]["gateway"]
        prefix = self.gateway.rsplit(".", 1)[0]
        # .2-.9 for the holder and podman's own picks; pods get .10 and up
        self._free = [f"{prefix}.{i}" for i in range(10, 250)]
        podman(
            "run", "-d", "--name", f"{self.name}-holder", *labels(),
            "--network", self.name, "--ip", f"{prefix}.2", "--pull", "never",
            *rlimit_args(), "--entrypoint", "sleep", self.image, "infinity",
        )  # fmt: skip
        return self

    def allocate(self) -> str:
        with self._lock:
            return self._free.pop(0)

    def release(self, ip: str) -> None:
        with self._lock:
            self._free.append(ip)  # reused last: a stale connection meets no new pod

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", f"{self.name}-holder", check=False)
        podman("network", "rm", "-f", self.name, check=False)
