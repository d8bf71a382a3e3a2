"""Fixtures of the deployment test (``make deploy-test``; never collected by plain pytest).

Session: the image (built once), helm, one podman network, Kafka and Redis on its gateway.
Module: the chart rendered and installed (:class:`Deployed`), shared by the scenarios of a
module in order; each scenario checks the whole input so far with ``dstream verify``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import infra
from tests.deploy.kube import Cluster, load_manifests, random_name
from tests.deploy.kubelet import Pod
from tests.deploy.podman import PodNetwork, remove_leftovers

RELEASE, NAMESPACE = "fleet", "default"
#: The app: examples/pageviews.py (running counts per url to Kafka, checkable exactly by
#: ``dstream verify``), mounted from the chart's app ConfigMap as users deploy theirs.
APP = infra.ROOT / "examples" / "pageviews.py"
INPUT, OUTPUT = "pageviews", "pageview-counts"
PARTITIONS = 6
#: Everything the pods log and the emulator's events end up here (gitignored).
OUT_DIR = infra.ROOT / "test-output" / "deploy"
#: Pods of a fresh install are ready within seconds (readiness: 2 s delay, 5 s period);
#: two minutes covers the first Kafka metadata calls on a loaded 2-core machine.
INSTALL_TIMEOUT_S = 120.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.deploy)


#: When this run loaded the fixtures: timings written before belong to an earlier run.
_LOADED_AT = time.time()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the scenarios' timings (test-output/deploy/timings.json) after the run."""
    path = OUT_DIR / "timings.json"
    if not path.exists() or path.stat().st_mtime < _LOADED_AT:
        return
    terminalreporter.section("deployment scenarios (seconds)")
    for name, values in json.loads(path.read_text()).items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()))


@pytest.fixture(scope="session")
def image() -> str:
    """The project's image, built once per run (first removing a killed run's leftovers)."""
    remove_leftovers()
    infra.stop_leftover_services()
    return infra.build_image()


@pytest.fixture(scope="session")
def helm() -> str:
    return infra.helm_binary()


@pytest.fixture(scope="session")
def network(image: str) -> Iterator[PodNetwork]:
    net = PodNetwork(f"dstream-deploy-{random_name()}", image).create()
    try:
        yield net
    finally:
        net.remove()


@pytest.fixture(scope="session")
def kafka(network: PodNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    handle, bootstrap = infra.start_kafka_on(network.gateway, tmp_path_factory.mktemp("kafka"))
    try:
        yield bootstrap
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def redis_url(network: PodNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = infra.start_redis_on(network.gateway, tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@dataclass
class Deployed:
    """The installed chart, with the host-side tools a user would point at it."""

    cluster: Cluster
    kafka: str
    redis_url: str
    topics: tuple[str, str] = (INPUT, OUTPUT)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def coordinators(self) -> list[Pod]:
        return self.cluster.running("coordinator")

    @property
    def workers(self) -> list[Pod]:
        return self.cluster.running("worker")

    def status(self) -> dict[str, Any]:
        """The leading coordinator's ``/api/status``, fetched from the host (the node)."""
        coord = next(p for p in self.coordinators if p.ready)
        port = coord.ports()["http"][1]
        url = f"http://{coord.ip}:{port}/api/status"
        with urllib.request.urlopen(url, timeout=5) as r:
            return dict(json.loads(r.read()))

    def produce(self, rate: float, seconds: float, seed: int) -> subprocess.Popen[str]:
        """``dstream produce`` in the background (``--duration``); wait on the result."""
        cmd = [*_dstream(), "produce", "--topic", self.topics[0], "--rate", str(rate)]
        cmd += ["--duration", str(seconds), "--kafka-bootstrap", self.kafka, "--keys", "500"]
        cmd += ["--seed", str(seed), "--partitions", str(PARTITIONS), "--no-progress"]
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=infra.clean_env()
        )

    def verify(self, wait: float = 180.0) -> subprocess.CompletedProcess[str]:
        """``dstream verify`` of the whole input against the committed output (exact)."""
        return infra.dstream(
            "verify",
            "--app",
            str(APP),
            "--kafka-bootstrap",
            self.kafka,
            "--input",
            self.topics[0],
            "--output",
            self.topics[1],
            "--wait",
            str(wait),
            "--max-print",
            "20",
            timeout=wait + 400,
        )

    def has_output(self) -> bool:
        """True once the output topic has a committed message (the fleet processes input)."""
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer(
            {
                "bootstrap.servers": self.kafka,
                "group.id": "deploy-test-probe",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
            }
        )
        try:
            md = c.list_topics(self.topics[1], timeout=5).topics.get(self.topics[1])
            if md is None or md.error is not None or not md.partitions:
                return False
            for p in md.partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(self.topics[1], p), timeout=5)
                if hi > lo:
                    return True
            return False
        finally:
            c.close()

    def diagnostics(self) -> str:
        """Pod states, the emulator's last events and each pod's log tail."""
        lines = [self.cluster.describe()]
        lines += [
            f"{e.at - self.cluster.t0:7.1f}s {e.pod} {e.what} {e.detail}"
            for e in self.cluster.events[-40:]
        ]
        for p in self.cluster.running():
            tail = "\n".join(p.logs().splitlines()[-25:])
            lines.append(f"--- {p.name} log tail:\n{tail}")
        return "\n".join(lines)


def _dstream() -> list[str]:
    import sys

    return [sys.executable, "-m", "ops.cli"]


def finish_producer(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    """Wait for a producer; fail the test unless every record was delivered."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"dstream produce failed: {out}"
    return out.strip().splitlines()[-1]


def check_verify(fleet: Deployed, wait: float = 180.0) -> float:
    """Run ``dstream verify``; fail with the differences and diagnostics unless exact."""
    t0 = time.monotonic()
    proc = fleet.verify(wait)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        pytest.fail(
            f"dstream verify failed (exit {proc.returncode}) after {took:.0f} s:\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n{fleet.diagnostics()}"
        )
    assert "0 differences" in proc.stdout or "ok" in proc.stdout.lower(), proc.stdout
    return took


@contextlib.contextmanager
def install(
    *,
    image: str,
    helm: str,
    network: PodNetwork,
    kafka: str,
    redis_url: str,
    release: str = RELEASE,
    topics: tuple[str, str] = (INPUT, OUTPUT),
    values: Sequence[Path] = (),
    sets: Mapping[str, str] | None = None,
    objects: Sequence[Mapping[str, Any]] = (),
    out: Path = OUT_DIR,
) -> Iterator[Deployed]:
    """Render the chart for this test's Kafka, Redis, app and image; install it; yield.

    The input topic is created (with :data:`PARTITIONS` partitions and a first 1,000
    records) before the install, as a user's input exists before the app is deployed;
    the coordinator creates the output topic. Other
    *topics* than the app's defaults reach both roles as ``PAGEVIEWS_TOPIC`` and
    ``PAGEVIEWS_OUTPUT`` (the chart's ``coordinator.extraEnv`` and ``worker.extraEnv``).
    Returns once every worker and at least one coordinator are ready (a standby is not).
    *objects* are created beside the chart's (what a user creates with kubectl first, e.g.
    an existing ConfigMap). The rendered manifests, each pod's log and the emulator's
    events go to *out*.
    """
    out.mkdir(parents=True, exist_ok=True)
    first = infra.dstream(
        "produce", "--topic", topics[0], "--rate", "0", "--count", "1000", "--keys", "500",
        "--partitions", str(PARTITIONS), "--kafka-bootstrap", kafka, "--seed", "1", "--no-progress",
    )  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    repo, _, tag = image.rpartition(":")
    all_sets = {
        "kafka.bootstrap": kafka,
        "redis.url": redis_url,
        "image.repository": repo.removeprefix("localhost/"),
        "image.tag": tag,
        **(sets or {}),
    }
    files = list(values)
    if topics != (INPUT, OUTPUT):
        env = [
            {"name": "PAGEVIEWS_TOPIC", "value": topics[0]},
            {"name": "PAGEVIEWS_OUTPUT", "value": topics[1]},
        ]
        topic_values = out / "topics-values.yaml"
        topic_values.write_text(
            json.dumps({"coordinator": {"extraEnv": env}, "worker": {"extraEnv": env}})
        )
        files.append(topic_values)
    rendered = infra.render_chart(helm, release, NAMESPACE, all_sets, {"app.source": APP}, files)
    (out / "rendered.yaml").write_text(rendered)
    cluster = Cluster([*load_manifests(rendered), *objects], network, out / "cluster")
    deployed = Deployed(cluster, kafka, redis_url, topics)
    cluster.install()
    try:
        t0 = time.monotonic()
        coord, workers = cluster.workload("Deployment"), cluster.workload("StatefulSet")
        try:
            cluster.wait(
                lambda: (
                    len(cluster.owned(coord)) == coord.replicas
                    and any(p.ready for p in cluster.owned(coord))
                ),
                INSTALL_TIMEOUT_S,
                "a ready coordinator",
            )
            cluster.wait_ready(workers, INSTALL_TIMEOUT_S)
        except TimeoutError as e:
            pytest.fail(f"the fleet did not become ready: {e}\n{deployed.diagnostics()}")
        deployed.timings["install_ready_s"] = time.monotonic() - t0
        try:
            cluster.wait(deployed.has_output, INSTALL_TIMEOUT_S, f"output on {topics[1]}")
        except TimeoutError as e:
            pytest.fail(f"the fleet wrote no output: {e}\n{deployed.diagnostics()}")
        deployed.timings["first_output_s"] = time.monotonic() - t0
        yield deployed
    finally:
        cluster.close()
        events = [
            {"t": round(e.at - cluster.t0, 2), "pod": e.pod, "what": e.what, **e.detail}
            for e in cluster.events
        ]
        (out / "events.json").write_text(json.dumps(events, indent=1, default=str))


@pytest.fixture(scope="module")
def fleet(
    image: str, helm: str, network: PodNetwork, kafka: str, redis_url: str
) -> Iterator[Deployed]:
    """The chart with default values (and the app's default topics), installed.

    To try a chart change by hand: ``DSTREAM_DEPLOY_VALUES`` (comma-separated values files,
    ``-f``) and ``DSTREAM_DEPLOY_SET`` (``k=v,k=v``, ``--set``, applied last).
    """
    logging.basicConfig(level=logging.INFO)
    sets = dict(
        kv.partition("=")[::2] for kv in os.environ.get("DSTREAM_DEPLOY_SET", "").split(",") if kv
    )
    values = [Path(v) for v in os.environ.get("DSTREAM_DEPLOY_VALUES", "").split(",") if v]
    with install(
        image=image,
        helm=helm,
        network=network,
        kafka=kafka,
        redis_url=redis_url,
        values=values,
        sets=sets,
    ) as deployed:
        yield deployed
