"""What the deployment test stands on: the image, helm, Kafka and Redis on the pod network.

Kafka and Redis run on the host (the project's own :mod:`ops.tools.devservices` start them), bound
to the pod network's gateway address (the host's own address on the podman bridge), on
their standard ports 9092 and 6379. So the pods reach them exactly as they would reach a
cluster's Kafka and Redis, and host-side tools (``dstream produce``, ``dstream verify``)
use the same addresses. The broker also keeps a loopback listener, which start-up uses to
see that it answers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ops.tools.devservices import (
    KafkaHandle,
    ensure_redis_server,
    free_port,
    start_kafka,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dstream-fleet"
#: The ports a cluster's Kafka and Redis usually have, which the chart's defaults name.
KAFKA_PORT, REDIS_PORT = 9092, 6379
#: Building the image reuses the cached base image and pip's wheel cache: well under a
#: minute; the first run adds a debootstrap (about 1 min) and helm's build.
BUILD_TIMEOUT_S = 900


#: Pids of the Kafka and Redis each run started, per run (the pytest process): a run that
#: was killed before its teardown leaves them running, and the next run stops them.
RUNS_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "dstream-fleet"
    / "deploy-runs"
)


def _remember(pid: int, mark: str) -> None:
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    path = RUNS_DIR / f"{os.getpid()}.json"
    procs = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*procs, {"pid": pid, "mark": mark}]))


def stop_leftover_services() -> list[int]:
    """Stop the Kafka and Redis of earlier runs whose pytest process is gone; their pids.

    A pid is signalled only while its command line still carries the mark it was started
    with (``kafka.Kafka``, ``redis-server``), so a reused pid is left alone.
    """
    stopped: list[int] = []
    for path in RUNS_DIR.glob("*.json") if RUNS_DIR.exists() else []:
        if Path(f"/proc/{path.stem}").exists():
            continue  # that run is still going
        for proc in json.loads(path.read_text()):
            try:
                cmdline = Path(f"/proc/{proc['pid']}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if proc["mark"].encode() in cmdline:
                os.kill(proc["pid"], signal.SIGKILL)
                stopped.append(proc["pid"])
        path.unlink()
    return stopped


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for host-side ``dstream`` commands: none of the caller's DSTREAM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTREAM_")}
    env.update(extra)
    return env


def build_image() -> str:
    """Build the project's image (ops/tools/devkit/build_image.sh); return its name."""
    proc = subprocess.run(
        ["bash", str(ROOT / "ops" / "tools" / "devkit" / "build_image.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "PYTHON": sys.executable},
        cwd=ROOT,
    )
    if proc.returncode != 0:
        msg = f"image build failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
        raise RuntimeError(msg)
    return proc.stdout.strip().splitlines()[-1]


def helm_binary() -> str:
    """helm: $DSTREAM_HELM, else the one ops/tools/devkit/install_helm.sh builds (and prints)."""
    if os.environ.get("DSTREAM_HELM"):
        return os.environ["DSTREAM_HELM"]
    proc = subprocess.run(
        ["bash", str(ROOT / "ops" / "tools" / "devkit" / "install_helm.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    if proc.returncode != 0:
        msg = f"install_helm.sh failed:\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    return proc.stdout.strip().splitlines()[-1]


def render_chart(
    helm: str,
    release: str,
    namespace: str,
    sets: Mapping[str, str],
    set_files: Mapping[str, Path] | None = None,
    values: Sequence[Path] = (),
) -> str:
    """``helm template`` of the chart with *sets* (``--set``) and *set_files*; the YAML."""
    cmd = [helm, "template", release, str(CHART), "--namespace", namespace]
    for v in values:
        cmd += ["-f", str(v)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    for k, f in (set_files or {}).items():
        cmd += ["--set-file", f"{k}={f}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        msg = f"helm template failed: {proc.stderr}"
        raise RuntimeError(msg)
    return proc.stdout


def start_kafka_on(host: str, home: Path) -> tuple[KafkaHandle, str]:
    """Kafka listening on ``host:9092`` (advertised there) and on a loopback port.

    Returns the handle and the bootstrap address pods and host tools use.
    """
    port, cport = free_port(), free_port()
    props = {
        "listeners": (
            f"PLAINTEXT://127.0.0.1:{port},POD://{host}:{KAFKA_PORT},CONTROLLER://127.0.0.1:{cport}"
        ),
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},POD://{host}:{KAFKA_PORT}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,POD:PLAINTEXT",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{cport}",
    }
    handle = start_kafka(home, port, cport, extra_properties=props)
    _remember(handle.pid, "kafka.Kafka")
    return handle, f"{host}:{KAFKA_PORT}"


@dataclass
class RedisOnHost:
    """A ``redis-server`` bound to one address (no persistence); :meth:`stop` ends it."""

    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_redis_on(host: str, home: Path) -> RedisOnHost:
    """Redis on ``host:6379``; returns once it answers PING."""
    import redis

    home.mkdir(parents=True, exist_ok=True)
    binary = ensure_redis_server()
    cmd = [binary, "--bind", host, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(home), "--protected-mode", "no"]
    with (home / "redis.log").open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _remember(proc.pid, "redis-server")
    url = f"redis://{host}:{REDIS_PORT}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    for _ in range(100):
        try:
            if client.ping():
                return RedisOnHost(proc, url)
        except redis.RedisError:
            if proc.poll() is not None:
                break
        time.sleep(0.1)
    proc.kill()
    msg = f"redis-server did not answer on {url}: {(home / 'redis.log').read_text()[-2000:]}"
    raise RuntimeError(msg)


def dstream(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the host's ``dstream`` CLI (this interpreter's) with a clean environment."""
    exe = shutil.which("dstream", path=str(Path(sys.executable).parent)) or "dstream"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=timeout, env=clean_env(**env)
    )
