"""Network partitions: every role a separate process in its own network namespace.

The fleet (coordinators and workers started with the real ``dstream coordinator`` and
``dstream worker`` commands, each with ``--bind-host`` and ``--advertise-host`` set to its
namespace's address) runs the fault app under steady input; one link is cut with
iptables ``DROP`` rules for :data:`PARTITION_S` while every process keeps running, then
healed. Kafka and Redis run in the root namespace on the bridge address
(:mod:`tests.fault.netns`), private to this module.

Each test checks that the committed output (Kafka ``read_committed`` and the Redis hash)
equals the plain-Python count of the whole input, one value per batch and url, strictly
increasing (:func:`tests.fault.scenario.check_exactly_once`); that the cut-off side was
fenced (its logs and ``dstream_fenced_total``); and prints the delays it measured: time
from the heal to the next completed batch, and the batches' ``total_delay`` (from the
leader's ``GET /api/status``) during and right after the partition.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from ops.tools.devservices import KafkaHandle, free_port, start_kafka
from ops.tools.produce import produce_pageviews
from tests.fault import netns
from tests.fault.netns import Network, Node
from tests.fault.scenario import check_exactly_once
from tests.fault.standby import Proc
from tests.fleetkit import fleet_env, read_topic, wait_for

APP = "tests/apps/fault_app.py"
SECRET = "partition-test-secret"
#: How long each link stays cut: the issue's "healed after 20 s".
PARTITION_S = 20.0
#: Fixed ports, the same in every namespace (as pods on their own addresses).
COORD_RPC, COORD_HTTP, WORKER_RPC, WORKER_HTTP = 7070, 8080, 7071, 8081
#: Input rate during the run (records/s) and the batch interval (s): small, for CI time.
RATE = 300
INTERVAL = 0.5
#: Rejoining after the heal takes a heartbeat or two (0.5 s each) and a connect: measured
#: 0.5 s; the bound leaves room for a loaded machine and a connect's SYN retry (1 s)
REJOIN_BOUND_S = 3.0

_REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"network partitions: {_REASON}")

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return 0, b""


# ----------------------------------------------------------------------------- services
@dataclass
class Services:
    """The module's network, and Kafka and Redis listening on its bridge address."""

    net: Network
    kafka: str
    redis_url: str
    redis_port: int
    nodes: dict[str, Node]


def _start_redis(host: str, port: int, home: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    cmd = [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no"]
    cmd += ["--protected-mode", "no", "--dir", str(home)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        wait_for(lambda: _ping(client), 10, "redis on the bridge", every=0.05)
    finally:
        client.close()
    return proc


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """Namespaces c1, c2 (coordinators), w1, w2 (workers); Kafka and Redis on the bridge."""
    home = tmp_path_factory.mktemp("partitions")
    kafka: KafkaHandle | None = None
    redis_proc: subprocess.Popen[bytes] | None = None
    with netns.network() as net:
        try:
            nodes = {n: net.add(n) for n in ("c1", "c2", "w1", "w2")}
            port, cport, rport = free_port(), free_port(), free_port()
            kafka = start_kafka(
                home / "kafka",
                port,
                cport,
                extra_properties={
                    # every interface (the readiness probe asks 127.0.0.1); the
                    # namespaces are told the bridge address
                    "listeners": f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://127.0.0.1:{cport}",
                    "advertised.listeners": f"PLAINTEXT://{net.host_ip}:{port}",
                },
            )
            redis_proc = _start_redis(net.host_ip, rport, home)
            yield Services(
                net, f"{net.host_ip}:{port}", f"redis://{net.host_ip}:{rport}/0", rport, nodes
            )
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(10)
            if kafka is not None:
                kafka.stop()


def _topic(bootstrap: str, partitions: int) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"partitions-{time.monotonic_ns()}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[
        name
    ].result(timeout=30)

    def ready() -> bool:
        t = admin.list_topics(name, timeout=5).topics.get(name)
        return (
            t is not None
            and t.error is None
            and len(t.partitions) == partitions
            and all(p.leader >= 0 for p in t.partitions.values())
        )

    wait_for(ready, 30, f"topic {name}", every=0.1)
    return name


# ----------------------------------------------------------------------------- the fleet
class Role(Proc):
    """A role's process inside its namespace, with its HTTP endpoints on the bridge."""

    def __init__(self, name: str, node: Node, argv: list[str], env: dict[str, str], tmp: Path):
        super().__init__(name, node.cmd(*argv), env, tmp)
        self.node = node

    def metric(self, port: int, name: str, **labels: str) -> float | None:
        """One sample of this process's ``/metrics`` (None when unreachable or absent)."""
        code, body = _get(f"http://{self.node.ip}:{port}/metrics")
        if code != 200:
            return None
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pat = re.compile(rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$", re.M)
        m = pat.search(body.decode())
        return float(m.group(1)) if m else None


class Coordinator(Role):
    def status(self) -> dict[str, Any]:
        code, body = _get(f"http://{self.node.ip}:{COORD_HTTP}/api/status")
        return json.loads(body) if code == 200 else {}

    def ready(self) -> bool:
        return _get(f"http://{self.node.ip}:{COORD_HTTP}/readyz")[0] == 200

    def fenced(self) -> float | None:
        return self.metric(COORD_HTTP, "dstream_fenced_total", role="coordinator")


@dataclass
class Seen:
    """A completed batch as the leader's status first showed it."""

    batch: int
    total_delay: float
    seen_at: float
    by: str


@dataclass
class Recorder:
    """Polls every coordinator's status; keeps each completed batch's first sighting.

    The status keeps only the last 50 batches, so a 20 s partition at 0.5 s batches needs
    polling while it lasts.
    """

    coordinators: list[Coordinator]
    seen: dict[int, Seen] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for c in self.coordinators:
                if not c.alive():
                    continue
                st = c.status()
                if st.get("role") != "leader":
                    continue
                now = time.monotonic()
                for b in st.get("batches", []):
                    if b.get("total_delay") is not None and b["batch"] not in self.seen:
                        self.seen[b["batch"]] = Seen(b["batch"], b["total_delay"], now, c.name)

    def start(self) -> Recorder:
        threading.Thread(target=self.run, name="status-recorder", daemon=True).start()
        return self

    def between(self, t0: float, t1: float) -> list[Seen]:
        return sorted(
            (s for s in list(self.seen.values()) if t0 <= s.seen_at < t1), key=lambda s: s.batch
        )

    def by(self, name: str) -> int:
        return sum(1 for s in list(self.seen.values()) if s.by == name)

    def next_after(self, t: float, timeout: float) -> float:
        """Seconds from *t* until a batch completes that had not been seen by *t*."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [s.seen_at for s in list(self.seen.values()) if s.seen_at >= t]
            if later:
                return min(later) - t
            time.sleep(0.05)
        raise AssertionError(f"no batch completed within {timeout} s of the heal")


class PartitionFleet:
    """Coordinators and workers, each in its namespace, on the module's services."""

    def __init__(self, sv: Services, app_id: str, tmp: Path, coordinators: tuple[str, ...]) -> None:
        self.sv = sv
        self.app_id = app_id
        self.input, self.output = _topic(sv.kafka, 6), _topic(sv.kafka, 2)
        nodes = sv.nodes
        base = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DSTREAM_")},
            **fleet_env(
                sv.kafka,
                sv.redis_url,
                app_id,
                (self.input, self.output),
                DSTREAM_SECRET=SECRET,
                DSTREAM_COORDINATOR=",".join(f"{nodes[c].ip}:{COORD_RPC}" for c in coordinators),
                DSTREAM_BATCH_INTERVAL=str(INTERVAL),
                DSTREAM_CHECKPOINT_EVERY="4",
                DSTREAM_LOG_LEVEL="INFO",
            ),
        }
        py = [sys.executable, "-m", "ops.cli"]
        self.coordinators = []
        for c in coordinators:
            ip = nodes[c].ip
            argv = [*py, "coordinator", "--app", APP, "--bind-host", ip]
            argv += ["--http-port", str(COORD_HTTP), "--expect-workers", "2"]
            # `dstream coordinator` has no --advertise-host flag: the setting, by env
            env = {**base, "DSTREAM_ADVERTISE_HOST": ip}
            self.coordinators.append(sv.net.track(Coordinator(c, nodes[c], argv, env, tmp)))
        self.workers = []
        for w in ("w1", "w2"):
            ip = nodes[w].ip
            argv = [*py, "worker", "--app", APP, "--bind-host", ip, "--advertise-host", ip]
            argv += ["--rpc-port", str(WORKER_RPC), "--http-port", str(WORKER_HTTP)]
            self.workers.append(sv.net.track(Role(w, nodes[w], argv, base, tmp)))
        self.recorder = Recorder(self.coordinators)

    def leader(self) -> Coordinator | None:
        ready = [c for c in self.coordinators if c.alive() and c.ready()]
        return ready[0] if len(ready) == 1 else None

    def wait_leader(self, timeout: float, other_than: Coordinator | None = None) -> Coordinator:
        found: list[Coordinator] = []

        def one() -> bool:
            c = self.leader()
            if c is not None and c is not other_than:
                found.append(c)
                return True
            return False

        try:
            wait_for(one, timeout, "a single leading coordinator", every=0.05)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log}") from None
        return found[-1]

    def worker_ids(self) -> set[str]:
        leader = self.leader()
        return {w["id"] for w in leader.status().get("workers", [])} if leader else set()

    @property
    def log(self) -> str:
        def tail(p: Proc) -> str:
            lines = [ln for ln in p.log.splitlines() if not ln.startswith("%")]
            return "\n".join(lines[-60:])

        return "\n".join(f"== {p.name}\n{tail(p)}" for p in self.coordinators + self.workers)

    def stop(self) -> None:
        self.recorder.stop.set()
        for p in self.workers + self.coordinators:
            p.stop()


def run_partition(
    fleet: PartitionFleet, fault: Callable[[PartitionFleet], dict[str, Any]]
) -> dict[str, Any]:
    """Start the fleet, feed it through *fault*, then check the output is exactly once."""
    kafka, inp, out = fleet.sv.kafka, fleet.input, fleet.output
    produce_pageviews(kafka, inp, rate=0, count=1000, keys=40, seed=41)
    for c in fleet.coordinators:
        c.start()
        time.sleep(0.5)  # the first one leads
    for w in fleet.workers:
        w.start()
    try:
        wait_for(lambda: len(read_topic(kafka, out, idle_s=0.3)) > 0, 90, "first output")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{fleet.log}") from None
    fleet.recorder.start()
    feeding = threading.Thread(
        target=produce_pageviews,
        args=(kafka, inp),
        kwargs={"rate": RATE, "duration": PARTITION_S + 6, "keys": 40, "seed": 42},
    )
    feeding.start()
    time.sleep(2.0)
    try:
        facts = fault(fleet)
    finally:
        feeding.join()
    expected = collections.Counter(json.loads(m.value())["url"] for m in read_topic(kafka, inp))

    def caught_up() -> bool:
        last: dict[str, int] = {}
        for m in read_topic(kafka, out, idle_s=0.3):
            k = json.loads(m.key())
            last[k] = max(last.get(k, 0), json.loads(m.value()))
        return last == dict(expected)

    try:
        wait_for(caught_up, 90, "the output to catch up with the input", every=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{fleet.log}") from None
    check_exactly_once(read_topic(kafka, out), expected)
    r = redis.Redis.from_url(fleet.sv.redis_url)
    try:
        stored = {
            k.decode(): json.loads(v)
            for k, v in r.hgetall(f"dstream:{fleet.app_id}:counts").items()
        }
    finally:
        r.close()
    assert stored == dict(expected), "the Redis output differs from the input counts"
    assert "Traceback" not in fleet.log, fleet.log
    return facts


def delays(fleet: PartitionFleet, cut_at: float, heal_at: float) -> dict[str, Any]:
    """The figures every test prints: total_delay during the partition and after the heal."""
    rec = fleet.recorder
    after = rec.next_after(heal_at, 60)
    time.sleep(3.0)  # let the batches cut during the partition complete and be seen
    settled = heal_at + after + 3.0
    during = rec.between(cut_at, heal_at)
    post = rec.between(heal_at, settled)
    td = [s.total_delay for s in during]
    times = [cut_at, *sorted(s.seen_at for s in rec.between(cut_at, settled))]
    gap = max(b - a for a, b in itertools.pairwise(times))
    return {
        "heal_to_next_batch_s": round(after, 2),
        "batches_completed_during_partition": len(during),
        "longest_gap_without_a_batch_s": round(gap, 2),
        "total_delay_during_partition_max_s": round(max(td), 2) if td else None,
        "total_delay_during_partition_median_s": round(statistics.median(td), 2) if td else None,
        "total_delay_after_heal_max_s": round(max(s.total_delay for s in post), 2)
        if post
        else None,
    }


def report(name: str, facts: dict[str, Any]) -> None:
    print(f"\n[partition] {name}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))


@pytest.fixture
def fleet_factory(
    services: Services, app_id: str, tmp_path: Path
) -> Iterator[Callable[..., PartitionFleet]]:
    made: list[PartitionFleet] = []

    def make(coordinators: tuple[str, ...] = ("c1",)) -> PartitionFleet:
        f = PartitionFleet(services, app_id, tmp_path, coordinators)
        made.append(f)
        return f

    try:
        yield make
    finally:
        for f in made:
            f.stop()


# ----------------------------------------------------------------------------- the tests
@pytest.mark.timeout(150)
def test_worker_cut_from_coordinator(fleet_factory, services: Services) -> None:
    """w1 loses the coordinator (only: Kafka, Redis and its peer w2 stay reachable)."""
    fleet = fleet_factory(("c1",))
    net, c1 = services.net, services.nodes["c1"]
    w1 = fleet.workers[0]
    w1_id = f"{w1.node.ip}:{WORKER_RPC}"

    def fault(fl: PartitionFleet) -> dict[str, Any]:
        wait_for(lambda: w1_id in fl.worker_ids(), 20, "w1 a member")
        cut = net.cut(w1.node, c1, what="w1 x c1")
        wait_for(lambda: w1_id not in fl.worker_ids(), 15, "w1 declared lost")
        lost_s = time.monotonic() - cut.at
        time.sleep(max(0.0, PARTITION_S - (time.monotonic() - cut.at)))
        # cut off, w1 stopped reading and commits nothing (its lease ran out)
        assert "lost (" in w1.log and "keeping" in w1.log, w1.log
        heal_at = net.heal(cut)
        wait_for(lambda: w1_id in fl.worker_ids(), 30, "w1 to rejoin")
        facts = {"declared_lost_s": round(lost_s, 2)}
        facts["heal_to_rejoin_s"] = round(time.monotonic() - heal_at, 2)
        facts.update(delays(fl, cut.at, heal_at))
        return facts

    facts = run_partition(fleet, fault)
    report("worker cut from coordinator", facts)
    # the fleet went on without w1: no wedge while the partition lasted
    assert facts["batches_completed_during_partition"] >= PARTITION_S / INTERVAL / 2, facts
    # the healed worker was unknown to the coordinator: it rejoined as a new incarnation,
    # so tasks launched before the cut could not commit
    assert "unknown to the coordinator" in w1.log, w1.log
    # its heartbeats dropped their connection on timing out, so the first one after the
    # heal connects afresh (kept, the connection waited for TCP's next retransmission:
    # 6.6-7.6 s after a 20 s cut)
    assert facts["heal_to_rejoin_s"] <= REJOIN_BOUND_S, facts


@pytest.mark.timeout(150)
def test_coordinator_cut_from_redis_standby_takes_over(fleet_factory, services: Services) -> None:
    """The leader c1 loses Redis; the standby c2 (which reaches it) takes over."""
    fleet = fleet_factory(("c1", "c2"))
    net = services.net
    old, new = fleet.coordinators

    def fault(fl: PartitionFleet) -> dict[str, Any]:
        assert fl.wait_leader(30) is old
        cut = net.cut(old.node, None, port=services.redis_port, what="c1 x redis")
        wait_for(new.ready, PARTITION_S, "the standby to lead")
        takeover_s = time.monotonic() - cut.at
        old_ready = old.ready()  # its lease lapsed: not ready, so a Service routes away
        time.sleep(max(0.0, PARTITION_S - (time.monotonic() - cut.at)))
        by_new_in_partition = fl.recorder.by(new.name)
        # the zombie is still up (it cannot learn it was deposed) and refuses to act
        assert old.alive(), old.log
        refused = old.fenced()
        assert refused is not None and refused > 0, f"fenced={refused}\n{old.log}"
        heal_at = net.heal(cut)
        assert old.proc is not None
        try:
            code = old.proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the deposed leader did not step down\n{old.log}") from None
        facts = {
            "takeover_s": round(takeover_s, 2),
            "batches_by_new_in_partition": by_new_in_partition,
        }
        facts["old_leader_refused"] = refused
        facts["old_leader_ready_in_partition"] = old_ready
        facts["heal_to_step_down_s"] = round(time.monotonic() - heal_at, 2)
        assert code == 4, f"exit code {code}: a deposed leader exits to come back as standby"
        facts.update(delays(fl, cut.at, heal_at))
        return facts

    facts = run_partition(fleet, fault)
    report("coordinator cut from redis, standby takes over", facts)
    assert "lost the leader lease" in old.log and new.node.ip in old.log, old.log
    assert "lease in doubt" in old.log, old.log
    # the workers moved to the standby: it completed batches while the partition lasted
    assert facts["batches_by_new_in_partition"], facts
    assert facts["old_leader_ready_in_partition"] is False, facts


@pytest.mark.timeout(150)
def test_coordinator_cut_from_all_workers(fleet_factory, services: Services) -> None:
    """c1 (alone, it keeps Redis) loses both workers; the fleet pauses, then resumes."""
    fleet = fleet_factory(("c1",))
    net = services.net
    c1 = fleet.coordinators[0]
    ids = {f"{w.node.ip}:{WORKER_RPC}" for w in fleet.workers}

    def fault(fl: PartitionFleet) -> dict[str, Any]:
        wait_for(lambda: fl.worker_ids() == ids, 20, "both workers members")
        cuts = [net.cut(c1.node, w.node, what=f"c1 x {w.name}") for w in fl.workers]
        t0 = cuts[0].at
        wait_for(lambda: not fl.worker_ids(), 15, "both workers declared lost")
        lost_s = time.monotonic() - t0
        time.sleep(max(0.0, PARTITION_S - (time.monotonic() - t0)))
        for w in fl.workers:
            assert "lost (" in w.log, w.log  # orphaned: stopped reading, commits nothing
        heal_at = 0.0
        for c in cuts:
            heal_at = net.heal(c)
        wait_for(lambda: fl.worker_ids() == ids, 30, "both workers to rejoin")
        facts = {"declared_lost_s": round(lost_s, 2)}
        facts["heal_to_rejoin_s"] = round(time.monotonic() - heal_at, 2)
        facts.update(delays(fl, t0, heal_at))
        return facts

    facts = run_partition(fleet, fault)
    report("coordinator cut from all workers", facts)
    assert c1.alive() and c1.ready(), "the coordinator keeps its lease through the partition"
    for w in fleet.workers:
        assert "unknown to the coordinator" in w.log, w.log
    # as in test_worker_cut_from_coordinator (about 7 s before the heartbeats reconnected)
    assert facts["heal_to_rejoin_s"] <= REJOIN_BOUND_S, facts
