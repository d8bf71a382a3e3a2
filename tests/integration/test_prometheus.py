"""The Grafana dashboard's queries, answered by a real Prometheus scraping a real fleet.

A coordinator and two workers run as separate processes (as the chart deploys them), each
serving ``/metrics`` on its own fixed HTTP port. Debian's ``prometheus`` (started here on a
free port, with its own config and storage in the test's tmp dir) scrapes them every second
with the labels the chart's ServiceMonitor gives their series under the Prometheus Operator:
``job`` from the Services' ``app.kubernetes.io/name`` (its ``jobLabel``), ``namespace``,
``pod``, ``service``, ``endpoint`` and ``app_kubernetes_io_component`` (its
``podTargetLabels``). It also loads the chart's alert rules (``files/alerts.yaml``).

With page views (and a few undecodable records) flowing, every panel query of
``helm/dstream-fleet/dashboards/dstream-fleet.json`` is evaluated through ``/api/v1/query``
with the template variables substituted and must return data of its shape: a series per
worker where the panel is per worker, one number for a stat, one series per label value for a
``by (...)`` query. Counts are exact: input records and dead letters as Prometheus sums them
equal what was produced, and the committed output equals a plain-Python count. Then a worker
is killed with SIGKILL: the live-workers panels drop to 1, the recovery panels show the
recovery, the per-worker panels lose the dead pod and ``DStreamWorkerLost`` goes active.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from tests.fault.standby import Proc
from tests.fleetkit import ROOT, fleet_env, last_values, read_topic, wait_for

CHART = ROOT / "helm" / "dstream-fleet"
DASHBOARD = CHART / "dashboards" / "dstream-fleet.json"
RULES = CHART / "files" / "alerts.yaml"
APP = "examples/pageviews.py"
PROMETHEUS = shutil.which("prometheus")
NAMESPACE = "streams"
#: The ServiceMonitor's ``jobLabel`` is app.kubernetes.io/name: the chart's name.
JOB = yaml.safe_load((CHART / "Chart.yaml").read_text())["name"]
RELEASE = "fleet"
PARTITIONS = 4
#: Page views per second and for how long: enough for every rate() window, kept short.
RATE, FEED_S = 800, 18.0
BAD_RECORDS = 7
SCRAPE_S = 1
#: Grafana's $__rate_interval is max(4 x scrape interval, $__interval + scrape interval).
RATE_INTERVAL = f"{4 * SCRAPE_S}s"
#: Panels whose quantiles may have no observation (NaN) before a worker is lost.
NAN_BEFORE_LOSS = {"Recovery time"}
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not found: install Debian's `prometheus` package (`make test-setup` does)",
)


# --- the dashboard ------------------------------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        if p.get("type") != "row":
            yield p
        yield from _panels(p.get("panels", []))


def _dashboard_range(dashboard: dict[str, Any]) -> str:
    """The dashboard's default time range (``now-1h`` -> ``1h``), for ``$__range``."""
    m = re.fullmatch(r"now-(\d+[smhdw])", dashboard["time"]["from"])
    assert m, dashboard["time"]
    return m.group(1)


def dashboard_queries() -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """(panel, target, expr) for every query, its variables substituted as Grafana would
    with one namespace and one job selected."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "job"}, variables
    subst = {
        "$__rate_interval": RATE_INTERVAL,
        "$__interval": f"{SCRAPE_S}s",
        "$__range": _dashboard_range(dashboard),
        "$namespace": NAMESPACE,  # no regex metacharacters in either: nothing to escape
        "$job": JOB,
    }
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel["targets"]:
            expr = target["expr"]
            for k, v in subst.items():  # longest names first: $__rate_interval before $__r...
                expr = expr.replace(k, v)
            assert "$" not in expr, f"{panel['title']}: unsubstituted variable in {expr}"
            out.append((panel, target, expr))
    return out


def grouping(expr: str) -> set[str]:
    """The labels the outermost aggregation keeps (``sum by (a, b) (...)``), minus ``le``."""
    m = re.match(r"\s*\w+\s+by\s*\(([^)]*)\)", expr) or re.search(
        r"histogram_quantile\([^,]+,\s*\w+\s+by\s*\(([^)]*)\)", expr
    )
    return {x.strip() for x in m.group(1).split(",")} - {"le"} if m else set()


# --- Prometheus ---------------------------------------------------------------------------------


class Prometheus:
    """A private Prometheus: its config, rules and storage in *tmp*, on a free port."""

    def __init__(self, tmp: Path, targets: list[tuple[int, dict[str, str]]]) -> None:
        self.port = free_port()
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_S}s",
                "scrape_timeout": f"{SCRAPE_S}s",
                "evaluation_interval": f"{SCRAPE_S}s",
            },
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "metrics_path": "/metrics",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"], "labels": labels}
                        for port, labels in targets
                    ],
                }
            ],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert PROMETHEUS is not None
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self.ready, 30, f"prometheus ready\n{self.log}", every=0.2)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str) -> Any:
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            pytest.fail(f"prometheus {urllib.parse.unquote(path)}: {e.code} {e.read().decode()}")

    def ready(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"prometheus exited:\n{self.log}"
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query (now): (labels, value) per series of the resulting vector."""
        got = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert got["status"] == "success", got
        data = got["data"]
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def active_alerts(self) -> dict[str, str]:
        """alertname -> state (pending or firing) of the alerts now active."""
        got = self.get("/api/v1/alerts")["data"]["alerts"]
        return {a["labels"]["alertname"]: a["state"] for a in got}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the fleet ----------------------------------------------------------------------------------


class MonitoredFleet:
    """A coordinator and two workers, each its own process on fixed HTTP ports, and the
    Prometheus that scrapes them as the ServiceMonitor would."""

    def __init__(self, kafka: str, redis_url: str, app_id: str, topics: dict[str, str], tmp: Path):
        ports: list[int] = []
        while len(ports) < 4:  # distinct: RPC, coordinator HTTP, two workers' HTTP
            if (p := free_port()) not in ports:
                ports.append(p)
        rpc, self.coordinator_port, *self.worker_ports = ports
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DSTREAM_")},
            **fleet_env(
                kafka,
                redis_url,
                app_id,
                (topics["input"], topics["output"]),
                DSTREAM_SECRET="prometheus-test-secret",
                DSTREAM_COORDINATOR=f"127.0.0.1:{rpc}",
                DSTREAM_BATCH_INTERVAL="0.5",
                DSTREAM_CHECKPOINT_EVERY="4",
                DSTREAM_DEAD_LETTER_TOPIC=topics["dead_letters"],
            ),
        }
        base = [sys.executable, "-m", "ops.cli"]
        self.coordinator = Proc(
            f"{RELEASE}-{JOB}-coordinator-0",
            [
                *base,
                *("coordinator", "--app", APP, "--bind-host", "127.0.0.1"),
                *("--http-port", str(self.coordinator_port), "--expect-workers", "2"),
            ],
            self.env,
            tmp,
        )
        self.workers = [
            Proc(
                f"{RELEASE}-{JOB}-worker-{i}",
                [
                    *base,
                    *("worker", "--app", APP, "--bind-host", "127.0.0.1"),
                    *("--rpc-port", "0", "--http-port", str(port)),
                ],
                self.env,
                tmp,
            )
            for i, port in enumerate(self.worker_ports)
        ]
        targets = [(self.coordinator_port, self._labels(self.coordinator, "coordinator"))]
        targets += [
            (p, self._labels(w, "worker"))
            for p, w in zip(self.worker_ports, self.workers, strict=True)
        ]
        self.prometheus = Prometheus(tmp, targets)

    @staticmethod
    def _labels(proc: Proc, component: str) -> dict[str, str]:
        """The target labels the Prometheus Operator derives from the ServiceMonitor."""
        service = f"{RELEASE}-{JOB}-{component}" + ("-headless" if component == "worker" else "")
        return {
            "namespace": NAMESPACE,
            "pod": proc.name,
            "service": service,
            "endpoint": "http",
            "container": component,
            "app_kubernetes_io_component": component,
        }

    @property
    def log(self) -> str:
        procs = [self.coordinator, *self.workers]
        fleet = "\n".join(f"== {p.name}\n{p.log[-3000:]}" for p in procs)
        return f"{fleet}\n== prometheus\n{self.prometheus.log[-3000:]}"

    def stop(self) -> None:
        for p in [*self.workers, self.coordinator]:
            p.stop()
        self.prometheus.stop()


@contextmanager
def monitored_fleet(
    kafka: str, redis_url: str, app_id: str, topics: dict[str, str], tmp: Path
) -> Iterator[MonitoredFleet]:
    fleet = MonitoredFleet(kafka, redis_url, app_id, topics, tmp)
    try:
        fleet.prometheus.start()
        fleet.coordinator.start()
        for w in fleet.workers:
            w.start()
        yield fleet
    finally:
        fleet.stop()


def _produce_bad_records(bootstrap: str, topic: str) -> None:
    """Records that are not JSON: the source dead-letters each (reason ``decode``)."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(BAD_RECORDS):
        p.produce(topic, b'{"url": "/truncated', key=b"bad", partition=i % PARTITIONS)
    assert p.flush(30) == 0


# --- checking the panels ------------------------------------------------------------------------


def check_panels(
    prom: Prometheus,
    queries: list[tuple[dict[str, Any], dict[str, Any], str]],
    expected_groups: dict[str, set[tuple[str, ...]]],
    allow_nan: set[str],
) -> list[str]:
    """Every query's result against its panel's shape; the problems found (empty: all good)."""
    problems = []
    for panel, target, expr in queries:
        title = f"{panel['title']} [{target.get('legendFormat', target['refId'])}]"
        result = prom.query(expr)
        keep = grouping(expr)
        if not result:
            problems.append(f"{title}: no data for {expr}")
            continue
        if not keep:  # a single number (a stat, or one line of a graph)
            if len(result) != 1:
                problems.append(f"{title}: {len(result)} series, want one: {result}")
                continue
        else:
            got = {tuple(labels.get(k, "") for k in sorted(keep)) for labels, _ in result}
            want = expected_groups.get(",".join(sorted(keep)))
            if want is not None and got != want:
                problems.append(f"{title}: series {sorted(got)}, want {sorted(want)}")
                continue
        values = [v for _, v in result]
        if panel["title"] not in allow_nan and not any(math.isfinite(v) for v in values):
            problems.append(f"{title}: no finite value in {result} for {expr}")
    return problems


def _one(prom: Prometheus, expr: str) -> float:
    """The single number *expr* gives now; NaN while it gives none (or several)."""
    result = prom.query(expr)
    return result[0][1] if len(result) == 1 else math.nan


def _poll(
    check: Callable[[], list[str]], timeout: float, what: str, log: Callable[[], str]
) -> None:
    problems: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        problems = check()
        if not problems:
            return
        time.sleep(SCRAPE_S)
    pytest.fail(f"{what} after {timeout}s:\n" + "\n".join(problems) + f"\n{log()}")


def test_dashboard_queries_answered_by_a_real_prometheus(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    topics = {"input": new_topic(PARTITIONS), "output": new_topic(1), "dead_letters": new_topic(1)}
    inp = topics["input"]
    queries = dashboard_queries()
    assert len(queries) >= 30
    by_title = {(p["title"], t["refId"]): e for p, t, e in queries}

    with monitored_fleet(kafka_bootstrap, redis_url, app_id, topics, tmp_path) as fleet:
        prom = fleet.prometheus
        workers = {(w.name,) for w in fleet.workers}
        expected_groups: dict[str, set[tuple[str, ...]]] = {
            "pod": workers,  # the per-worker panels (the leader panel is checked below)
            "topic": {(inp,)},
            "partition,topic": {(str(p), inp) for p in range(PARTITIONS)},
            "reason": {("decode",), ("encode",), ("user",)},
            "dependency": {("kafka",), ("redis",)},
            "role": {("coordinator",), ("worker",)},
        }
        leader_expr = by_title[("Leader by coordinator pod", "A")]
        queries_wo_leader = [q for q in queries if q[0]["title"] != "Leader by coordinator pod"]

        try:
            wait_for(lambda: _scraped(prom) == 3, 60, "prometheus scraping all three", every=0.5)
        except AssertionError as e:
            down = [
                (t["labels"]["pod"], t["health"], t["lastError"])
                for t in prom.get("/api/v1/targets")["data"]["activeTargets"]
            ]
            raise AssertionError(f"{e}: {down}\n{fleet.log}") from None
        started = time.monotonic()
        feeding = threading.Thread(
            target=produce_pageviews,
            args=(kafka_bootstrap, inp),
            kwargs={"rate": RATE, "duration": FEED_S, "keys": 30, "seed": 17},
        )
        feeding.start()
        try:
            _produce_bad_records(kafka_bootstrap, inp)

            def healthy() -> list[str]:
                problems = check_panels(prom, queries_wo_leader, expected_groups, NAN_BEFORE_LOSS)
                leader = prom.query(leader_expr)
                if [(m.get("pod"), v) for m, v in leader] != [(fleet.coordinator.name, 1.0)]:
                    problems.append(f"Leader by coordinator pod: {leader}")
                if _one(prom, by_title[("Live workers", "A")]) != 2:
                    problems.append("Live workers: not 2")
                if not _one(prom, by_title[("Input rate", "A")]) > 0:
                    problems.append("Input rate: not > 0")
                if _one(prom, by_title[("Batch interval", "A")]) != 0.5:
                    problems.append("Batch interval: not 0.5 s")
                return problems

            _poll(
                healthy, FEED_S + 20, "the dashboard queries do not all answer", lambda: fleet.log
            )
            during_feed = time.monotonic() - started
        finally:
            feeding.join()

        # exact: the committed output is a plain-Python count of the good records ...
        good = [m for m in read_topic(kafka_bootstrap, inp) if m.key() != b"bad"]
        expected = collections.Counter(json.loads(m.value())["url"] for m in good)
        wait_for(
            lambda: (
                last_values(read_topic(kafka_bootstrap, topics["output"], idle_s=0.3))
                == dict(expected)
            ),
            60,
            f"the output to equal the input counts\n{fleet.log}",
            every=1.0,
        )
        # ... and Prometheus's sums of the counters equal what was produced
        sel = f'namespace="{NAMESPACE}", job="{JOB}"'
        total = len(good) + BAD_RECORDS

        def counted() -> bool:
            records = _one(prom, f'sum(dstream_input_records_total{{{sel}, topic="{inp}"}})')
            dead = _one(prom, f"sum(dstream_dead_lettered_records_total{{{sel}}})")
            return (records, dead) == (total, BAD_RECORDS)

        wait_for(counted, 15, "input and dead-letter counts in prometheus to equal the input")
        assert "DStreamWorkerLost" not in prom.active_alerts()
        assert "DStreamNoLeader" not in prom.active_alerts()

        # a worker is lost: the live-workers and recovery panels must show it
        victim, survivor = fleet.workers[1], fleet.workers[0]
        victim.signal(signal.SIGKILL)
        seen: dict[str, bool] = collections.defaultdict(bool)

        def shows_the_loss() -> list[str]:
            seen["live workers stat = 1"] |= _one(prom, by_title[("Live workers", "A")]) == 1
            seen["live workers over time = 1"] |= (
                _one(prom, by_title[("Live workers over time", "A")]) == 1
            )
            seen["recoveries stat >= 1"] |= _one(prom, by_title[("Recoveries", "A")]) >= 1
            seen["recovery time p50 measured"] |= math.isfinite(
                _one(prom, by_title[("Recovery time", "A")])
            )
            for ref in ("Block store bytes", "Block store blocks"):
                pods = {m["pod"] for m, _ in prom.query(by_title[(ref, "A")])}
                seen[f"{ref}: only the survivor"] |= pods == {survivor.name}
            seen["DStreamWorkerLost active"] |= "DStreamWorkerLost" in prom.active_alerts()
            return [k for k in WANT_AFTER_LOSS if not seen[k]]

        _poll(shows_the_loss, 45, "the dashboard does not show the lost worker", lambda: fleet.log)
        assert fleet.coordinator.alive(), fleet.log
        # every panel still answers (the recovery quantiles included) with one worker left;
        # the survivor reports the lag of the partitions it took over once its consumer has
        # fetched their watermarks, a scrape or two after the reassignment
        expected_groups["pod"] = {(survivor.name,)}
        _poll(
            lambda: check_panels(prom, queries_wo_leader, expected_groups, {"Recovery time"}),
            30,
            "the panels do not all answer with one worker left",
            lambda: fleet.log,
        )
        print(f"panels answered {during_feed:.1f}s after traffic started")


WANT_AFTER_LOSS = (
    "live workers stat = 1",
    "live workers over time = 1",
    "recoveries stat >= 1",
    "recovery time p50 measured",
    "Block store bytes: only the survivor",
    "Block store blocks: only the survivor",
    "DStreamWorkerLost active",
)


def _scraped(prom: Prometheus) -> int:
    """Targets whose last scrape succeeded."""
    return int(sum(v for _, v in prom.query(f'up{{job="{JOB}"}}')))


def test_grouping_of_panel_queries() -> None:
    assert grouping("sum by (topic, partition) (x)") == {"topic", "partition"}
    assert grouping("histogram_quantile(0.5, sum by (le, stage) (rate(x[1m])))") == {"stage"}
    assert grouping("histogram_quantile(0.5, sum by (le) (rate(x[1m])))") == set()
    assert grouping("max(x)") == set()


def test_scrape_labels_are_the_service_monitors() -> None:
    """The labels given to the targets above are those the chart's ServiceMonitor implies."""
    sm = (CHART / "templates" / "servicemonitor.yaml").read_text()
    assert "jobLabel: app.kubernetes.io/name" in sm  # job = the chart's name
    targets = re.search(r"podTargetLabels:\n((?:\s+- .+\n)+)", sm)
    assert targets is not None
    labels = {line.strip("- \n") for line in targets.group(1).splitlines()}
    # the Prometheus Operator names a pod target label after the sanitized pod label
    assert {re.sub(r"[^a-zA-Z0-9_]", "_", label) for label in labels} == {
        "app_kubernetes_io_component"
    }
