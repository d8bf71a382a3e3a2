"""Local dev services: a real single-node Apache Kafka (KRaft) and a real Redis.

Both run on loopback ports, started by the project itself:

* **Kafka** runs from the ``org.apache.kafka:kafka_2.13`` jars, resolved once with Maven
  (``ops/tools/devkit/pom.xml``) into ``${XDG_CACHE_HOME:-~/.cache}/dstream-fleet/kafka-<v>/libs``
  and reused by every later run; its storage is formatted with
  ``kafka.tools.StorageTool format --standalone`` and the broker (combined broker and
  controller, ``node.id=1``) runs as ``java -cp '<libs>/*' kafka.Kafka server.properties``.
* **Redis** is Debian's ``redis-server`` (installed with apt when missing and running as
  root), without persistence, daemonized with a pid file.

Two ways to use them:

* ``dstream dev up|down|status|env`` (see :mod:`ops.tools.cli_dev`) manages one long-lived
  instance per *dev home* (``DSTREAM_DEV_HOME``, default ``<cache>/dev``), recorded in
  ``<home>/state.json``; :func:`discovered_env` lets every dstream command find it.
* :class:`DevServices` (test fixtures, benchmarks) starts a private pair on free ports in a
  directory of its own and stops it on :meth:`DevServices.close`.

Every failure a user can fix (no java, no mvn, a port in use, a broker that does not come
up) raises :class:`engine.errors.ServiceError` with a one-line message saying what to do.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.errors import ServiceError

#: Must match ``kafka.version`` in ``ops/tools/devkit/pom.xml``.
KAFKA_VERSION = "4.3.1"
HOST = "127.0.0.1"
DEFAULT_KAFKA_PORT = 19092
DEFAULT_CONTROLLER_PORT = 19093
DEFAULT_REDIS_PORT = 16379
#: A cold JVM formats and starts the combined broker/controller in about 5 s on 2 cores;
#: 60 s leaves room for a loaded CI machine without hiding a broker that never comes up.
KAFKA_START_TIMEOUT_S = 60.0
#: redis-server answers PING within milliseconds; 10 s only covers a loaded machine.
REDIS_START_TIMEOUT_S = 10.0
#: A clean Kafka shutdown (controlled shutdown, log flush) takes a few seconds; after this
#: the broker is killed, which is harmless for dev data.
STOP_TIMEOUT_S = 15.0
#: Maven needs a while on a cold ~/.m2 (about 45 MB of jars).
MVN_TIMEOUT_S = 900.0
KAFKA_HEAP = "-Xmx512m"
LOG_TAIL_LINES = 20

_DEVKIT = Path(__file__).resolve().parent / "devkit"
_POM = _DEVKIT / "pom.xml"
_STATE_FILE = "state.json"
_KAFKA_MARK = "kafka.Kafka"
_REDIS_MARK = "redis-server"
# Kafka children started by this process, kept so they are reaped (no zombies) on stop.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}

_LOG4J2 = _DEVKIT / "log4j2.properties"


# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """The per-user cache folder, ``${XDG_CACHE_HOME:-~/.cache}/dstream-fleet``.

    Holds the resolved Kafka jars (shared by every dev home and test session). Outside the
    repository on purpose: the jars survive ``git clean`` and fresh clones.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dstream-fleet"


def dev_home() -> Path:
    """Where ``dstream dev`` keeps its runtime state: ``DSTREAM_DEV_HOME`` or ``<cache>/dev``."""
    env = os.environ.get("DSTREAM_DEV_HOME")
    return Path(env) if env else cache_dir() / "dev"


# --------------------------------------------------------------------------- ports


def free_port(host: str = HOST) -> int:
    """Return a TCP port that is free on *host* right now (the OS picks it).

    Another process may take it before the caller binds it; callers that start a server on
    it fail with a clear "port in use" error in that (rare) case.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when *port* on *host* cannot be bound (someone listens on it).

    ``SO_REUSEADDR`` is set as the servers set it, so sockets in ``TIME_WAIT`` left by a
    previous run do not count as "in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def ensure_port_free(port: int, service: str, flag: str = "") -> None:
    """Raise :class:`ServiceError` when *port* is taken; *flag* names the option to change it.

    Raises:
        ServiceError: ``"<service> port <port> on 127.0.0.1 is already in use ..."``.

    """
    if port_in_use(port):
        hint = f"; pick another with {flag}" if flag else ""
        msg = (
            f"{service} port {port} on {HOST} is already in use by another process"
            f"{hint} or stop that process"
        )
        raise ServiceError(msg)


# --------------------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    """Linux process state letter from ``/proc/<pid>/stat``, or None when unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


def _pid_alive(pid: int, mark: str) -> bool:
    """True when *pid* runs (not a zombie) and its command line contains *mark*.

    The *mark* check guards against a recycled pid after a reboot or crash.
    """
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():  # not Linux: trust the pid
        return True
    if _proc_state(pid) == "Z":
        return False
    try:
        return mark in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def _stop_pid(pid: int, mark: str, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM *pid* (if it is still ours), wait up to *timeout*, then SIGKILL. Idempotent."""
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return
    if not _pid_alive(pid, mark):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid, mark):
        time.sleep(0.1)
    if _pid_alive(pid, mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _pid_alive(pid, mark):
            time.sleep(0.05)


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(empty log at {path})"


def _out(proc: subprocess.CompletedProcess[str]) -> str:
    """The last lines of a finished command's stdout and stderr, for an error message."""
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-LOG_TAIL_LINES:])


def find_executable(name: str, hint: str, explicit: str | None = None) -> str:
    """Return the path of *name* (or of *explicit* when given); raise when it is missing.

    For ``java``, ``$JAVA_HOME/bin/java`` wins over ``PATH``.

    Raises:
        ServiceError: ``"<name> not found on PATH: <hint>"``.

    """
    if explicit is not None:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return explicit
        found = shutil.which(explicit)
        if found:
            return found
        msg = f"{name} not found at {explicit}: {hint}"
        raise ServiceError(msg)
    if name == "java" and os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if not found:
        msg = f"{name} not found on PATH: {hint}"
        raise ServiceError(msg)
    return found


_JAVA_HINT = "install a Java 17+ runtime (apt-get install -y openjdk-17-jre-headless)"
_MVN_HINT = "install Maven (apt-get install -y maven) to resolve the Kafka jars"


# --------------------------------------------------------------------------- kafka


def _pom_digest() -> str:
    return hashlib.sha256(_POM.read_bytes()).hexdigest()


def ensure_kafka_libs(
    cache: Path | None = None, *, mvn: str | None = None, quiet: bool = True
) -> Path:
    """Resolve the Kafka broker's jars into ``<cache>/kafka-<version>/libs``; return that dir.

    Idempotent and cheap once done: a marker file holding the pom's digest says the folder
    is complete, so a later call returns at once (and a changed pom resolves again).
    Concurrent callers (parallel test sessions, ``make setup``) serialise on a lock file;
    the jars are copied into a temporary folder first and renamed, so a half-copied folder
    is never used.

    Raises:
        ServiceError: ``mvn`` is missing or ``mvn dependency:copy-dependencies`` fails.

    """
    root = (cache or cache_dir()) / f"kafka-{KAFKA_VERSION}"
    libs = root / "libs"
    marker = root / "complete"
    digest = _pom_digest()
    if marker.exists() and marker.read_text().strip() == digest and libs.is_dir():
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text().strip() == digest and libs.is_dir():
            return libs
        mvn_bin = find_executable("mvn", _MVN_HINT, mvn)
        tmp = root / "libs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [mvn_bin, "-B", "-f", str(_POM), "dependency:copy-dependencies"]
        cmd += ["-DincludeScope=runtime", f"-DoutputDirectory={tmp}"]
        if quiet:
            cmd.insert(1, "-q")
        else:
            print(f"resolving Kafka {KAFKA_VERSION} jars with Maven into {libs}", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=MVN_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            msg = f"mvn did not resolve the Kafka jars within {MVN_TIMEOUT_S:.0f} s"
            raise ServiceError(msg) from e
        if proc.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            msg = f"mvn could not resolve the Kafka jars (exit {proc.returncode}):\n{_out(proc)}"
            raise ServiceError(msg)
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        marker.write_text(digest + "\n")
    return libs


def new_cluster_id() -> str:
    """A random KRaft cluster id: a UUID in URL-safe base64 without padding (22 chars).

    Same format as ``kafka-storage random-uuid``; ids starting with ``-`` are avoided as
    Kafka avoids them (they read as command-line options).
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def render_server_properties(
    data_dir: Path,
    port: int,
    controller_port: int,
    *,
    host: str = HOST,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The ``server.properties`` of a single-node combined broker/controller (KRaft).

    Deterministic for given arguments. Replication factors and ISR minimums are 1 (one
    node), internal topics are small (fast first transaction and first group), the
    transaction abort check runs every second (fault tests see zombie transactions
    aborted quickly) and the log cleaner's buffer fits the 512 MB heap. *extra* overrides
    or adds keys.
    """
    props: dict[str, str] = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "log.retention.hours": "24",
        "auto.create.topics.enable": "true",
    }
    if extra:
        props.update(extra)
    lines = ["# written by ops/tools/devservices.py; regenerated on every start"]
    lines += [f"{k}={v}" for k, v in props.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class KafkaHandle:
    """A running (or once running) dev Kafka broker; values only, safe to serialise."""

    pid: int
    port: int
    controller_port: int
    home: Path
    host: str = HOST

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap.servers``."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "kafka.log"

    def is_running(self) -> bool:
        """True while the broker process lives (no network call)."""
        return _pid_alive(self.pid, _KAFKA_MARK)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the broker (SIGTERM, SIGKILL after *timeout*), remove its pid file. Idempotent."""
        _stop_pid(self.pid, _KAFKA_MARK, timeout)
        (self.home / "kafka.pid").unlink(missing_ok=True)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "home": str(self.home), "bootstrap": self.bootstrap}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KafkaHandle:
        return cls(
            int(d["pid"]), int(d["port"]), int(d["controller_port"]), Path(d["home"]), d["host"]
        )


def _kafka_ready(bootstrap: str, timeout: float) -> bool:
    """One metadata request; True when the broker answered within *timeout*."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        md = admin.list_topics(timeout=timeout)
    except Exception:  # KafkaException while the listener is not up yet
        return False
    return bool(md.brokers)


def start_kafka(
    home: Path,
    port: int,
    controller_port: int,
    *,
    java: str | None = None,
    libs: Path | None = None,
    timeout: float = KAFKA_START_TIMEOUT_S,
    extra_properties: Mapping[str, str] | None = None,
    fresh: bool = True,
) -> KafkaHandle:
    """Format fresh storage under *home* and start a broker; return once it answers metadata.

    With ``fresh=False`` and storage already formatted under *home*, the broker restarts on
    its existing data (fault tests restart a broker mid-run).

    *home* is wiped of earlier data (a dev broker always starts empty). The JVM runs in its
    own session, so it outlives the calling process (``dstream dev up`` exits) until
    :meth:`KafkaHandle.stop`. Logs go to ``<home>/kafka.log``, the pid to
    ``<home>/kafka.pid``.

    Raises:
        ServiceError: java or the jars are missing, a port is in use, formatting fails, the
            broker exits, or it does not answer within *timeout* (with the log's tail).

    """
    java_bin = find_executable("java", _JAVA_HINT, java)
    ensure_port_free(port, "Kafka", "--kafka-port")
    ensure_port_free(controller_port, "Kafka controller", "--controller-port")
    libs = libs or ensure_kafka_libs()
    home.mkdir(parents=True, exist_ok=True)
    data = home / "data"
    keep = not fresh and (data / "meta.properties").exists()
    if not keep:
        shutil.rmtree(data, ignore_errors=True)
    props = home / "server.properties"
    props.write_text(render_server_properties(data, port, controller_port, extra=extra_properties))
    log4j = home / "log4j2.properties"
    shutil.copyfile(_LOG4J2, log4j)
    log_path = home / "kafka.log"
    base = [java_bin, f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{libs}/*"]
    fmt = subprocess.run(
        [
            *base,
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            new_cluster_id(),
            "-c",
            str(props),
        ]
        if not keep
        else ["true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if fmt.returncode != 0:
        msg = f"Kafka storage format failed (exit {fmt.returncode}):\n{_out(fmt)}"
        raise ServiceError(msg)
    jvm = [KAFKA_HEAP, "-Xms128m", "-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError"]
    jvm += ["-Djava.awt.headless=true", f"-Dkafka.logs.dir={home}"]
    cmd = [base[0], *jvm, *base[1:], "kafka.Kafka", str(props)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    (home / "kafka.pid").write_text(f"{proc.pid}\n")
    handle = KafkaHandle(proc.pid, port, controller_port, home)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            (home / "kafka.pid").unlink(missing_ok=True)
            _CHILDREN.pop(proc.pid, None)
            msg = (
                f"Kafka exited with code {proc.returncode} during start-up; "
                f"last lines of {log_path}:\n{_log_tail(log_path)}"
            )
            raise ServiceError(msg)
        if _kafka_ready(handle.bootstrap, 1.0):
            return handle
        if time.monotonic() >= deadline:
            handle.stop(timeout=5.0)
            msg = (
                f"Kafka did not answer on {handle.bootstrap} within {timeout:.0f} s; "
                f"last lines of {log_path}:\n{_log_tail(log_path)}"
            )
            raise ServiceError(msg)
        time.sleep(0.2)


# --------------------------------------------------------------------------- redis


def ensure_redis_server(explicit: str | None = None) -> str:
    """Return the path of ``redis-server``, installing Debian's package when root.

    Raises:
        ServiceError: missing and not root (or not a Debian-like system), or apt fails.

    """
    if explicit is not None:
        return find_executable("redis-server", "install it with apt-get", explicit)
    found = shutil.which("redis-server")
    if found:
        return found
    apt = shutil.which("apt-get")
    if os.geteuid() != 0 or apt is None:
        msg = (
            "redis-server not found on PATH: install it (sudo apt-get install -y redis-server)"
            " or point DSTREAM_REDIS_URL at a running Redis"
        )
        raise ServiceError(msg)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("installing redis-server with apt-get", file=sys.stderr)
    install = [apt, "install", "-y", "--no-install-recommends", "redis-server"]
    proc = subprocess.run(install, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # stale or missing package lists: update once and retry
        subprocess.run([apt, "update"], capture_output=True, text=True, env=env)
        proc = subprocess.run(install, capture_output=True, text=True, env=env)
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if proc.returncode != 0 or not found:
        msg = f"apt-get install redis-server failed (exit {proc.returncode}):\n{_out(proc)}"
        raise ServiceError(msg)
    return found


@dataclass(frozen=True)
class RedisHandle:
    """A running (or once running) dev Redis; values only, safe to serialise."""

    pid: int
    port: int
    home: Path
    host: str = HOST

    @property
    def url(self) -> str:
        """``redis://host:port/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.home / "redis.log"

    def is_running(self) -> bool:
        """True while the server process lives (no network call)."""
        return _pid_alive(self.pid, _REDIS_MARK)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server (SIGTERM, SIGKILL after *timeout*), remove its pid file. Idempotent."""
        _stop_pid(self.pid, _REDIS_MARK, timeout)
        (self.home / "redis.pid").unlink(missing_ok=True)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "home": str(self.home), "url": self.url}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RedisHandle:
        return cls(int(d["pid"]), int(d["port"]), Path(d["home"]), d["host"])


def _redis_ping(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_redis(
    home: Path,
    port: int,
    *,
    redis_server: str | None = None,
    timeout: float = REDIS_START_TIMEOUT_S,
) -> RedisHandle:
    """Start a daemonized ``redis-server`` without persistence; return once it answers PING.

    Pid file ``<home>/redis.pid``, log ``<home>/redis.log``, working dir ``<home>/data``.

    Raises:
        ServiceError: redis-server is missing (and cannot be installed), the port is in use,
            or it does not answer PING within *timeout* (with the log's tail).

    """
    binary = ensure_redis_server(redis_server)
    ensure_port_free(port, "Redis", "--redis-port")
    home.mkdir(parents=True, exist_ok=True)
    data = home / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    pidfile, log_path = home / "redis.pid", home / "redis.log"
    pidfile.unlink(missing_ok=True)
    cmd = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    cmd += ["--daemonize", "yes", "--pidfile", str(pidfile), "--logfile", str(log_path)]
    cmd += ["--dir", str(data), "--protected-mode", "yes"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        msg = f"redis-server failed to start (exit {proc.returncode}): {out}\n{_log_tail(log_path)}"
        raise ServiceError(msg)
    url = f"redis://{HOST}:{port}/0"
    deadline = time.monotonic() + timeout
    while True:
        pid = _read_pid(pidfile)
        if pid and _redis_ping(url):
            return RedisHandle(pid, port, home)
        if time.monotonic() >= deadline:
            if pid:
                _stop_pid(pid, _REDIS_MARK, 2.0)
            msg = (
                f"Redis did not answer PING on {HOST}:{port} within {timeout:.0f} s; "
                f"last lines of {log_path}:\n{_log_tail(log_path)}"
            )
            raise ServiceError(msg)
        time.sleep(0.05)


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class DevState:
    """What ``dstream dev up`` started in one dev home (``<home>/state.json``)."""

    kafka: KafkaHandle | None = None
    redis: RedisHandle | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "kafka": self.kafka.to_json() if self.kafka else None,
            "redis": self.redis.to_json() if self.redis else None,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DevState:
        k, r = d.get("kafka"), d.get("redis")
        return cls(
            kafka=KafkaHandle.from_json(k) if k else None,
            redis=RedisHandle.from_json(r) if r else None,
        )

    def running(self) -> DevState:
        """The same state without the services whose process is gone."""
        return DevState(
            kafka=self.kafka if self.kafka and self.kafka.is_running() else None,
            redis=self.redis if self.redis and self.redis.is_running() else None,
        )


def load_state(home: Path | None = None) -> DevState:
    """Read ``<home>/state.json``; a missing or corrupt file reads as "nothing started"."""
    path = (home or dev_home()) / _STATE_FILE
    try:
        raw = json.loads(path.read_text())
        return DevState.from_json(raw) if isinstance(raw, dict) else DevState()
    except (OSError, ValueError, KeyError, TypeError):
        return DevState()


def save_state(state: DevState, home: Path | None = None) -> None:
    """Write ``<home>/state.json`` atomically (write to a temp file, then rename)."""
    home = home or dev_home()
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{_STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n")
    tmp.replace(home / _STATE_FILE)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Serialise ``up``/``down`` on one dev home (two shells running ``dev up`` at once)."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def use_dev_services(environ: MutableMapping[str, str] | None = None) -> None:
    """Point ``DSTREAM_KAFKA_BOOTSTRAP`` and ``DSTREAM_REDIS_URL`` at the dev services.

    Only where they are unset and ``dstream dev up`` services run (flags still win over
    both), so no flag is needed on a dev machine. Called by the ``dstream`` command, the
    demo and the benchmarks; never by the runtime.
    """
    env = os.environ if environ is None else environ
    if "DSTREAM_KAFKA_BOOTSTRAP" in env and "DSTREAM_REDIS_URL" in env:
        return
    try:
        found = discovered_env()
    except Exception:  # no state file, unreadable: nothing to use
        return
    if found.get("kafka_bootstrap"):
        env.setdefault("DSTREAM_KAFKA_BOOTSTRAP", found["kafka_bootstrap"])
    if found.get("redis_url"):
        env.setdefault("DSTREAM_REDIS_URL", found["redis_url"])


def discovered_env(home: Path | None = None) -> dict[str, str]:
    """Addresses of the services ``dstream dev up`` started that still run.

    Returns ``{"kafka_bootstrap": "127.0.0.1:19092", "redis_url": "redis://..."}`` with only
    the keys of running services (``{}`` when none). Cheap (one small file read, no network)
    and never raises, so settings can call it on every start.
    """
    try:
        state = load_state(home).running()
    except Exception:  # discovery must never break a command
        return {}
    env: dict[str, str] = {}
    if state.kafka:
        env["kafka_bootstrap"] = state.kafka.bootstrap
    if state.redis:
        env["redis_url"] = state.redis.url
    return env


@dataclass(frozen=True)
class ServiceStatus:
    """One line of ``dstream dev status``: a service, where it is, who manages it."""

    name: str
    address: str
    state: str  # "running", "external", "stopped"
    pid: int = 0
    log: str = ""

    def line(self) -> str:
        extra = f"  pid {self.pid}" if self.pid else ""
        log = f"  log {self.log}" if self.log else ""
        return f"{self.name:<6} {self.state:<8} {self.address}{extra}{log}"


def status(
    home: Path | None = None, environ: Mapping[str, str] | None = None
) -> list[ServiceStatus]:
    """Report Kafka and Redis: started by ``dev up`` (running), taken from env, or stopped."""
    environ = os.environ if environ is None else environ
    state = load_state(home).running()
    out: list[ServiceStatus] = []
    if environ.get("DSTREAM_KAFKA_BOOTSTRAP"):
        out.append(ServiceStatus("kafka", environ["DSTREAM_KAFKA_BOOTSTRAP"], "external"))
    elif state.kafka:
        k = state.kafka
        out.append(ServiceStatus("kafka", k.bootstrap, "running", k.pid, str(k.log_path)))
    else:
        out.append(ServiceStatus("kafka", "-", "stopped"))
    if environ.get("DSTREAM_REDIS_URL"):
        out.append(ServiceStatus("redis", environ["DSTREAM_REDIS_URL"], "external"))
    elif state.redis:
        r = state.redis
        out.append(ServiceStatus("redis", r.url, "running", r.pid, str(r.log_path)))
    else:
        out.append(ServiceStatus("redis", "-", "stopped"))
    return out


def up(
    home: Path | None = None,
    *,
    kafka_port: int = DEFAULT_KAFKA_PORT,
    controller_port: int = DEFAULT_CONTROLLER_PORT,
    redis_port: int = DEFAULT_REDIS_PORT,
    kafka_timeout: float = KAFKA_START_TIMEOUT_S,
    environ: Mapping[str, str] | None = None,
) -> list[ServiceStatus]:
    """Start what is not running yet; idempotent (a second call only reports).

    A service named by ``DSTREAM_KAFKA_BOOTSTRAP`` / ``DSTREAM_REDIS_URL`` is not started.
    A running service keeps its ports even when other ports are asked for. A service whose
    process died since is started afresh (empty data). The state file is written after
    each service starts, so a failing Kafka leaves a started Redis recorded (``down``
    stops it).

    Raises:
        ServiceError: see :func:`start_kafka` and :func:`start_redis`.

    """
    home = home or dev_home()
    environ = os.environ if environ is None else environ
    with _locked(home):
        state = load_state(home).running()
        save_state(state, home)
        want_kafka = not environ.get("DSTREAM_KAFKA_BOOTSTRAP") and state.kafka is None
        want_redis = not environ.get("DSTREAM_REDIS_URL") and state.redis is None
        # preflight: fail before starting anything when a tool or a port is missing
        if want_kafka:
            find_executable("java", _JAVA_HINT)
            ensure_port_free(kafka_port, "Kafka", "--kafka-port")
            ensure_port_free(controller_port, "Kafka controller", "--controller-port")
        if want_redis:
            ensure_redis_server()
            ensure_port_free(redis_port, "Redis", "--redis-port")
        if want_kafka:
            ensure_kafka_libs()
        if want_redis:
            state = DevState(state.kafka, start_redis(home / "redis", redis_port))
            save_state(state, home)
        if want_kafka:
            kafka = start_kafka(home / "kafka", kafka_port, controller_port, timeout=kafka_timeout)
            state = DevState(kafka, state.redis)
            save_state(state, home)
    return status(home, environ)


def down(home: Path | None = None) -> list[str]:
    """Stop what ``up`` started in *home*, remove pid files and wipe data; idempotent.

    Returns the names of the services that were stopped.
    """
    home = home or dev_home()
    stopped: list[str] = []
    with _locked(home):
        state = load_state(home)
        if state.kafka:
            if state.kafka.is_running():
                stopped.append("kafka")
            state.kafka.stop()
        if state.redis:
            if state.redis.is_running():
                stopped.append("redis")
            state.redis.stop()
        for sub in ("kafka", "redis"):
            shutil.rmtree(home / sub / "data", ignore_errors=True)
            (home / sub / f"{sub}.pid").unlink(missing_ok=True)
        save_state(DevState(), home)
    return stopped


# --------------------------------------------------------------------------- fixtures API


#: The tests' and benchmarks' broker creates no topic on first use, as production brokers
#: are run: whatever a fleet writes to must exist or be created by it (``ops.topics``).
TEST_BROKER_PROPERTIES = {"auto.create.topics.enable": "false"}


class DevServices:
    """A private Kafka + Redis pair on free ports under *home*, for tests and benchmarks.

    Never touches the ``dstream dev up`` instance. Services start lazily on first access
    of :attr:`kafka_bootstrap` / :attr:`redis_url`, unless *environ* names external ones
    (``DSTREAM_KAFKA_BOOTSTRAP`` / ``DSTREAM_REDIS_URL``), which are then returned as is.
    :meth:`close` stops whatever this object started; use it as a context manager.
    """

    def __init__(self, home: Path, environ: Mapping[str, str] | None = None) -> None:
        self.home = home
        self._environ = os.environ if environ is None else environ
        self.kafka: KafkaHandle | None = None
        self.redis: RedisHandle | None = None

    @property
    def kafka_bootstrap(self) -> str:
        external = self._environ.get("DSTREAM_KAFKA_BOOTSTRAP")
        if external:
            return external
        if self.kafka is None:
            port = free_port()
            controller = next(p for p in iter(free_port, None) if p != port)
            self.kafka = start_kafka(
                self.home / "kafka", port, controller, extra_properties=TEST_BROKER_PROPERTIES
            )
        return self.kafka.bootstrap

    @property
    def redis_url(self) -> str:
        external = self._environ.get("DSTREAM_REDIS_URL")
        if external:
            return external
        if self.redis is None:
            self.redis = start_redis(self.home / "redis", free_port())
        return self.redis.url

    def close(self) -> None:
        """Stop the services this object started (idempotent)."""
        if self.kafka is not None:
            self.kafka.stop()
            self.kafka = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> DevServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
