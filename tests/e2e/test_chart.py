"""The Helm chart: lint, render with every ci values file, validate against Kubernetes schemas.

helm is built by ``make test-setup`` (``ops/tools/devkit/install_helm.sh``); it is found through
``$DSTREAM_HELM``, the build's cache dir, then ``PATH``. Without it these tests FAIL: the
chart is part of the product and must not silently go untested.

Where the chart and the code must agree (ports, flags, settings), the tests load the rendered
environment and arguments with the code itself (``ops.config.Settings``,
``ops.cli.build_parser``) instead of repeating its numbers; the docs are checked against the
chart, the settings, the metrics and the HTTP endpoints.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from ops import metrics
from ops.cli import build_parser
from ops.config import (
    COORDINATOR_HTTP_PORT,
    COORDINATOR_RPC_PORT,
    WORKER_HTTP_PORT,
    WORKER_RPC_PORT,
    Settings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dstream-fleet"
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
CASES = [None, *CI_FILES]
CASE_IDS = ["default", *(p.name for p in CI_FILES)]
RELEASE = "fleet"
NAMESPACE = "streams"
#: Oldest and newest Kubernetes versions whose schemas the manifests must satisfy.
K8S_VERSIONS = ("1.29.0", "1.37.0")
#: Custom resources: no schema in kubernetes-validate; their fields are checked by assertion.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
#: ``DSTREAM_*`` variables that are not settings, and the file that reads each.
NON_SETTING_VARS = {
    "DSTREAM_LOG_LEVEL": ROOT / "ops" / "cli_roles.py",
    "DSTREAM_UPDATE_SCREENSHOTS": ROOT / "tests" / "e2e" / "test_status_page.py",
    "DSTREAM_FAULT_CRASH": ROOT / "ops" / "faults.py",
    "DSTREAM_FAULT_SLOW": ROOT / "ops" / "faults.py",
}
DOCS = (
    ROOT / "docs" / "deploy.md",
    ROOT / "docs" / "operations.md",
    ROOT / "docs" / "architecture.md",
)
#: librdkafka's port when a bootstrap entry has none; Redis's for a URL without one.
KAFKA_DEFAULT_PORT = 9092
REDIS_DEFAULT_PORT = 6379


def _find_helm() -> str | None:
    env = os.environ.get("DSTREAM_HELM")
    if env:
        return env
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    built = cache / "dstream-fleet" / "bin" / "helm"
    if built.is_file() and os.access(built, os.X_OK):
        return str(built)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    path = _find_helm()
    if path is not None and not (Path(path).is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"DSTREAM_HELM={path} is not an executable helm binary", pytrace=False)
    if path is None:
        pytest.fail(
            "helm not found: run `make test-setup` (or `bash ops/tools/devkit/install_helm.sh`), "
            "or point DSTREAM_HELM at a helm v3 binary",
            pytrace=False,
        )
    return path


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@functools.cache
def _render(helm: str, values: Path | None, *sets: str) -> list[dict[str, Any]]:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        cmd += ["--values", str(values)]
    for s in sets:
        cmd += ["--set", s]
    out = _run(cmd)
    assert out.returncode == 0, f"helm template failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge values as helm does: maps recursively, null deletes the key."""
    merged = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            merged.pop(k, None)
        elif isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = copy.deepcopy(v)
    return merged


def _values(values: Path | None) -> dict[str, Any]:
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    if values is None:
        return base
    return _deep_merge(base, yaml.safe_load(values.read_text()) or {})


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {[d['kind'] for d in docs]}"
    return found[0]


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _pod_name(workload: dict[str, Any]) -> str:
    """A name the workload's first pod gets (StatefulSet: ordinal 0)."""
    name = workload["metadata"]["name"]
    return f"{name}-0" if workload["kind"] == "StatefulSet" else f"{name}-7d9f8b6c5-x2x4q"


def _process_env(
    docs: list[dict[str, Any]], workload: dict[str, Any], container: dict[str, Any]
) -> dict[str, str]:
    """The environment the container's process sees, as the kubelet builds it.

    ConfigMaps of ``envFrom`` first, then ``env`` in order (a later entry wins), with
    ``$(VAR)`` expanded from what is defined before it; Secrets are stand-ins (the JSON
    settings an empty object) and field references resolve to the pod's name and namespace.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    fields = {"metadata.name": _pod_name(workload), "metadata.namespace": NAMESPACE}
    for e in container.get("env", []):
        if "value" in e:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), e["value"]
            )
        elif "fieldRef" in e["valueFrom"]:
            value = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            assert "secretKeyRef" in e["valueFrom"], e
            value = "{}" if e["name"] == "DSTREAM_KAFKA_CONFIG" else "stand-in secret"
        env[e["name"]] = value
    return env


def _process(
    monkeypatch: pytest.MonkeyPatch,
    docs: list[dict[str, Any]],
    workload: dict[str, Any],
    container: dict[str, Any],
) -> tuple[Settings, argparse.Namespace]:
    """The settings and parsed arguments of the container's ``dstream`` process.

    The image's entrypoint is ``dstream``: the rendered args go through the real parser, and
    the settings load from the rendered environment with the flags that name a setting
    overriding it, as ``dstream coordinator`` and ``dstream worker`` do.
    """
    args = build_parser().parse_args(container["args"])
    for name in list(os.environ):
        if name.startswith("DSTREAM_"):
            monkeypatch.delenv(name)
    for name, value in _process_env(docs, workload, container).items():
        monkeypatch.setenv(name, value)
    flags = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return load_settings(**flags), args


def _port(address: str) -> int:
    """The port of ``host:port``."""
    return int(address.rpartition(":")[2])


def _rule_ports(rule: dict[str, Any]) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


def _bootstrap_ports(bootstrap: str) -> set[int]:
    """The ports of a Kafka bootstrap list (librdkafka: 9092 when an entry has none)."""
    ports = set()
    for entry in (e.strip() for e in bootstrap.split(",")):
        if entry:
            m = re.search(r":(\d+)$", entry)
            ports.add(int(m[1]) if m else KAFKA_DEFAULT_PORT)
    return ports


def _redis_ports(url: str) -> set[int]:
    """The port of a Redis URL (6379 when a redis:// or rediss:// URL has none)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return set()  # unix://: a local socket
    return {parts.port or REDIS_DEFAULT_PORT}


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request: pytest.FixtureRequest, helm: str) -> tuple[Path | None, list[dict[str, Any]]]:
    return request.param, _render(helm, request.param)


# --- lint and schema validation --------------------------------------------------------------


@pytest.mark.parametrize("values", CASES, ids=CASE_IDS)
def test_helm_lint(helm: str, values: Path | None) -> None:
    cmd = [helm, "lint", "--strict", str(CHART)]
    if values is not None:
        cmd += ["--values", str(values)]
    out = _run(cmd)
    assert out.returncode == 0, f"helm lint failed:\n{out.stdout}\n{out.stderr}"


def test_every_ci_file_is_numbered_by_feature() -> None:
    assert len(CI_FILES) >= 6
    for p in CI_FILES:
        number, _, feature = p.name.partition("-")
        assert number.isdigit() and len(number) == 2, p.name
        assert feature.endswith("-values.yaml") and feature != "-values.yaml", p.name


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(case: Any, k8s_version: str) -> None:
    _, docs = case
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {k8s_version}): {e}")


def test_everything_is_namespaced_and_labelled(case: Any) -> None:
    _, docs = case
    for doc in docs:
        meta = doc["metadata"]
        assert meta.get("namespace") == NAMESPACE, f"{doc['kind']}/{meta['name']}"
        labels = meta["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/name"] == "dstream-fleet"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert len(meta["name"]) <= 63


# --- security, probes, resources ---------------------------------------------------------------


def test_pods_run_hardened(case: Any) -> None:
    _, docs = case
    for wl in _workloads(docs):
        pod = wl["spec"]["template"]["spec"]
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc.get("runAsUser", 0) != 0
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["tmp"]
        for c in _containers(wl):
            where = f"{wl['kind']}/{wl['metadata']['name']}/{c['name']}"
            csc = c["securityContext"]
            assert csc.get("runAsNonRoot", psc["runAsNonRoot"]) is True, where
            assert csc.get("runAsUser", psc["runAsUser"]) != 0, where
            assert csc.get("privileged", False) is False, where
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert "ALL" in csc["capabilities"]["drop"], where
            assert not csc["capabilities"].get("add"), where
            assert {"name": "tmp", "mountPath": "/tmp"}.items() <= next(
                m for m in c["volumeMounts"] if m["name"] == "tmp"
            ).items(), where


def test_containers_have_probes_and_resources(case: Any) -> None:
    _, docs = case
    for wl in _workloads(docs):
        for c in _containers(wl):
            where = f"{wl['kind']}/{wl['metadata']['name']}/{c['name']}"
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert set(ports) == {"rpc", "http"}, where
            assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}, where
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, where
            res = c["resources"]
            for part in ("requests", "limits"):
                assert res[part].get("cpu") and res[part].get("memory"), f"{where} {part}"
            # The process serves its probes and /metrics on DSTREAM_HTTP_PORT.
            assert _env(c)["DSTREAM_HTTP_PORT"]["value"] == str(ports["http"]), where


def test_probe_timings_come_from_values(helm: str) -> None:
    docs = _render(helm, None, "worker.livenessProbe.periodSeconds=17")
    sts = _of_kind(docs, "StatefulSet")[0]
    probe = sts["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    assert probe["periodSeconds"] == 17
    assert probe["httpGet"]["path"] == "/livez"


# --- selectors and wiring ----------------------------------------------------------------------


def test_selectors_match_pod_templates(case: Any) -> None:
    _, docs = case
    workloads = _workloads(docs)
    assert {w["kind"] for w in workloads} == {"Deployment", "StatefulSet"}
    for wl in workloads:
        sel = wl["spec"]["selector"]["matchLabels"]
        assert _matches(sel, wl["spec"]["template"]["metadata"]["labels"]), wl["metadata"]["name"]
        others = [w for w in workloads if w is not wl]
        assert not any(_matches(sel, w["spec"]["template"]["metadata"]["labels"]) for w in others)
    for svc in _of_kind(docs, "Service"):
        sel = svc["spec"]["selector"]
        hits = [w for w in workloads if _matches(sel, w["spec"]["template"]["metadata"]["labels"])]
        assert len(hits) == 1, f"Service {svc['metadata']['name']} selects {len(hits)} workloads"
        container_ports = {p["name"] for c in _containers(hits[0]) for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in container_ports, svc["metadata"]["name"]
    for pdb in _of_kind(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        hits = [w for w in workloads if _matches(sel, w["spec"]["template"]["metadata"]["labels"])]
        assert [h["kind"] for h in hits] == ["StatefulSet"]
        assert pdb["spec"]["maxUnavailable"] == 1


def test_workers_have_stable_identities(case: Any) -> None:
    values, docs = case
    vals = _values(values)
    sts = _of_kind(docs, "StatefulSet")[0]
    assert sts["spec"]["replicas"] == vals["worker"]["replicas"]
    headless = _one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert _matches(headless["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])
    worker = sts["spec"]["template"]["spec"]["containers"][0]
    assert worker["args"][:3] == ["worker", "--app", "/app/app.py"]
    env = _env(worker)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["DSTREAM_ADVERTISE_HOST"]["value"] == (
        f"$(POD_NAME).{headless['metadata']['name']}.$(POD_NAMESPACE).svc"
    )
    # $(VAR) expands only from variables defined earlier in the list.
    names = [e["name"] for e in worker["env"]]
    assert names.index("POD_NAME") < names.index("DSTREAM_ADVERTISE_HOST")
    assert names.index("POD_NAMESPACE") < names.index("DSTREAM_ADVERTISE_HOST")


def test_coordinator_and_settings(case: Any) -> None:
    values, docs = case
    vals = _values(values)
    dep = _of_kind(docs, "Deployment")[0]
    assert dep["spec"]["replicas"] == (2 if vals["coordinator"]["standby"]["enabled"] else 1)
    coord = dep["spec"]["template"]["spec"]["containers"][0]
    assert coord["args"][:3] == ["coordinator", "--app", "/app/app.py"]
    svc = _one(docs, "Service", dep["metadata"]["name"])
    ports = vals["coordinator"]["ports"]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "rpc": ports["rpc"],
        "http": ports["http"],
    }

    settings_name = f"{RELEASE}-dstream-fleet-settings"
    settings = _one(docs, "ConfigMap", settings_name)["data"]
    for wl in _workloads(docs):
        for c in _containers(wl):
            assert {"configMapRef": {"name": settings_name}} in c["envFrom"]
    assert settings["DSTREAM_COORDINATOR"] == (
        f"{svc['metadata']['name']}.{NAMESPACE}.svc:{ports['rpc']}"
    )
    assert settings["DSTREAM_BIND_HOST"] == "0.0.0.0"
    s = vals["settings"]
    assert float(settings["DSTREAM_BATCH_INTERVAL"]) == s["batchInterval"]
    assert int(settings["DSTREAM_NUM_PARTITIONS"]) == s["numPartitions"]
    assert int(settings["DSTREAM_CHECKPOINT_EVERY"]) == s["checkpointEvery"]
    assert int(settings["DSTREAM_TASK_SLOTS"]) == s["taskSlots"]
    assert settings["DSTREAM_KAFKA_BOOTSTRAP"] == vals["kafka"]["bootstrap"]
    assert settings["DSTREAM_REDIS_URL"] == vals["redis"]["url"]
    assert settings["DSTREAM_APP_ID"] == (vals["app"]["id"] or f"{RELEASE}-dstream-fleet")
    for k, v in s["extraEnv"].items():
        assert settings[k] == str(v)
    if vals["kafka"]["config"] and not vals["kafka"]["existingSecret"]:
        assert json.loads(settings["DSTREAM_KAFKA_CONFIG"]) == vals["kafka"]["config"]
    else:
        assert "DSTREAM_KAFKA_CONFIG" not in settings
    # Nothing secret in the settings ConfigMap.
    assert not any("PASSWORD" in k or k == "DSTREAM_SECRET" for k in settings)


# --- the chart and the code agree ----------------------------------------------------------------


def test_chart_defaults_are_the_code_defaults() -> None:
    vals = _values(None)
    assert vals["coordinator"]["ports"] == {
        "rpc": COORDINATOR_RPC_PORT,
        "http": COORDINATOR_HTTP_PORT,
    }
    assert vals["worker"]["ports"] == {"rpc": WORKER_RPC_PORT, "http": WORKER_HTTP_PORT}
    # The image EXPOSEs the same ports.
    exposed = {
        int(p)
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.split()[:1] == ["EXPOSE"]
        for p in line.split()[1:]
    }
    assert exposed == {
        COORDINATOR_RPC_PORT,
        COORDINATOR_HTTP_PORT,
        WORKER_RPC_PORT,
        WORKER_HTTP_PORT,
    }


def test_processes_listen_where_the_chart_points(
    case: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each role's process, as the code reads the rendered pod, listens on the ports that the
    pod, its Service and its probes name, and reaches the coordinator where it listens."""
    values, docs = case
    vals = _values(values)
    dep = _of_kind(docs, "Deployment")[0]
    sts = _of_kind(docs, "StatefulSet")[0]
    coord_svc = _one(docs, "Service", dep["metadata"]["name"])
    headless = _one(docs, "Service", sts["spec"]["serviceName"])
    coord_c = dep["spec"]["template"]["spec"]["containers"][0]
    worker_c = sts["spec"]["template"]["spec"]["containers"][0]

    coord, coord_args = _process(monkeypatch, docs, dep, coord_c)
    assert coord_args.command == "coordinator"
    assert coord_args.expect_workers == vals["worker"]["replicas"]
    worker, worker_args = _process(monkeypatch, docs, sts, worker_c)
    assert worker_args.command == "worker"

    for settings, role, container, svc in (
        (coord, "coordinator", coord_c, coord_svc),
        (worker, "worker", worker_c, headless),
    ):
        ports = vals[role]["ports"]
        container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
        listens = {
            "rpc": _port(settings.coordinator) if role == "coordinator" else settings.rpc_port,
            "http": settings.http_port_for(role),
        }
        assert listens == ports, role
        assert container_ports == ports, role
        assert service_ports == {name: (port, name) for name, port in ports.items()}, role
        assert settings.bind_host == "0.0.0.0", role  # every interface of the pod

    # Workers reach the coordinator through its Service, at the port it listens on.
    assert worker.coordinator == coord.coordinator
    host = worker.coordinator.rpartition(":")[0]
    assert host == f"{coord_svc['metadata']['name']}.{NAMESPACE}.svc"
    # Peers reach a worker by its stable name in the headless Service.
    assert worker.advertise_host == (
        f"{_pod_name(sts)}.{headless['metadata']['name']}.{NAMESPACE}.svc"
    )


def test_every_dstream_variable_is_read(case: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``DSTREAM_*`` that nothing reads: each is a setting (or read where listed)."""
    _, docs = case
    fields = {f"DSTREAM_{name.upper()}" for name in Settings.model_fields}
    for wl in _workloads(docs):
        for c in _containers(wl):
            env = _process_env(docs, wl, c)
            unknown = {k for k in env if k.startswith("DSTREAM_")} - fields - set(NON_SETTING_VARS)
            assert not unknown, f"{wl['metadata']['name']}: nothing reads {sorted(unknown)}"
            _process(monkeypatch, docs, wl, c)  # and every value is valid


def test_tls_settings_point_into_the_mounted_secret(
    case: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    values, docs = case
    tls = _values(values)["rpc"]["tls"]
    for wl in _workloads(docs):
        pod = wl["spec"]["template"]["spec"]
        for c in pod["containers"]:
            settings, _ = _process(monkeypatch, docs, wl, c)
            files = (settings.tls_cert, settings.tls_key, settings.tls_ca)
            if not tls["enabled"]:
                assert files == ("", "", ""), wl["metadata"]["name"]
                continue
            (mount,) = [m for m in c["volumeMounts"] if m["name"] == "tls"]
            # No subPath: an updated Secret reaches the mounted files (rotation).
            assert "subPath" not in mount and mount["readOnly"] is True
            (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
            items = {i["path"] for i in volume["secret"]["items"]}
            for f in files:
                directory, _, name = f.rpartition("/")
                assert directory == mount["mountPath"] and name in items, f


def test_startup_probe_is_optional(case: Any) -> None:
    values, docs = case
    vals = _values(values)
    for wl in _workloads(docs):
        role = wl["metadata"]["labels"]["app.kubernetes.io/component"]
        want = vals[role]["startupProbe"]
        (c,) = wl["spec"]["template"]["spec"]["containers"]
        if not want["enabled"]:
            assert "startupProbe" not in c, role
            continue
        probe = c["startupProbe"]
        assert probe.pop("httpGet") == {"path": "/livez", "port": "http"}, role
        assert probe == {k: v for k, v in want.items() if k != "enabled"}, role


def test_startup_probe_off_by_default_on_in_the_tuned_ci_file(helm: str) -> None:
    assert not _values(None)["coordinator"]["startupProbe"]["enabled"]
    assert not _values(None)["worker"]["startupProbe"]["enabled"]
    tuned = _render(helm, _ci("tuned"))
    assert all("startupProbe" in c for wl in _workloads(tuned) for c in _containers(wl))


def test_app_file_is_mounted(case: Any) -> None:
    values, docs = case
    app = _values(values)["app"]
    for wl in _workloads(docs):
        pod = wl["spec"]["template"]["spec"]
        vol = next(v for v in pod["volumes"] if v["name"] == "app")["configMap"]
        for c in pod["containers"]:
            mount = next(m for m in c["volumeMounts"] if m["name"] == "app")
            assert mount["mountPath"] == "/app"
            assert mount["readOnly"] is True
        if app["existingConfigMap"]:
            assert vol["name"] == app["existingConfigMap"]
            assert vol["items"] == [{"key": app["existingConfigMapKey"], "path": "app.py"}]
        else:
            cm = _one(docs, "ConfigMap", vol["name"])
            assert cm["data"]["app.py"].strip() == app["source"].strip()
            assert vol["items"] == [{"key": "app.py", "path": "app.py"}]
    if app["existingConfigMap"]:
        assert all(not d["metadata"]["name"].endswith("-app") for d in _of_kind(docs, "ConfigMap"))


# --- secrets -----------------------------------------------------------------------------------


def test_secret_references_match_values(case: Any) -> None:
    values, docs = case
    vals = _values(values)
    rpc_name = vals["rpc"]["existingSecret"] or f"{RELEASE}-dstream-fleet-rpc"
    expected = {"DSTREAM_SECRET": (rpc_name, vals["rpc"]["existingSecretKey"])}
    for env_name, section in (
        ("DSTREAM_KAFKA_CONFIG", "kafka"),
        ("DSTREAM_REDIS_PASSWORD", "redis"),
    ):
        if vals[section]["existingSecret"]:
            expected[env_name] = (
                vals[section]["existingSecret"],
                vals[section]["existingSecretKey"],
            )
    for wl in _workloads(docs):
        for c in _containers(wl):
            refs = {
                e["name"]: (
                    e["valueFrom"]["secretKeyRef"]["name"],
                    e["valueFrom"]["secretKeyRef"]["key"],
                )
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            }
            assert refs == expected, f"{wl['metadata']['name']}/{c['name']}"
            # Secrets reach the process only through secretKeyRef, never as plain values.
            for e in c["env"]:
                if e["name"] in {"DSTREAM_SECRET", "DSTREAM_REDIS_PASSWORD"}:
                    assert "value" not in e

    secrets = _of_kind(docs, "Secret")
    if vals["rpc"]["existingSecret"]:
        assert secrets == []
    else:
        (secret,) = secrets
        assert secret["metadata"]["name"] == rpc_name
        raw = base64.b64decode(secret["data"][vals["rpc"]["existingSecretKey"]])
        assert len(raw) >= 32


def test_generated_rpc_secret_is_random_per_install(helm: str) -> None:
    first = _render(helm, None)
    second = _render(helm, None, "nameOverride=dstream-fleet")  # same names, new render
    (a,) = _of_kind(first, "Secret")
    (b,) = _of_kind(second, "Secret")
    assert a["data"] != b["data"]


def test_tls_secret_is_mounted(case: Any) -> None:
    values, docs = case
    tls = _values(values)["rpc"]["tls"]
    for wl in _workloads(docs):
        pod = wl["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            env = _env(c)
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            if not tls["enabled"]:
                assert "tls" not in volumes and "DSTREAM_TLS_CERT" not in env
                continue
            assert volumes["tls"]["secret"]["secretName"] == tls["existingSecret"]
            assert mounts["tls"]["mountPath"] == "/etc/dstream/tls"
            assert mounts["tls"]["readOnly"] is True
            for var, key in (
                ("DSTREAM_TLS_CERT", tls["certKey"]),
                ("DSTREAM_TLS_KEY", tls["keyKey"]),
                ("DSTREAM_TLS_CA", tls["caKey"]),
            ):
                assert env[var]["value"] == f"/etc/dstream/tls/{key}"
                assert {"key": key, "path": key} in volumes["tls"]["secret"]["items"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("redis.url=redis://user:hunter2@redis:6379/0", "redis/url"),
        ("rpc.tls.enabled=true", "existingSecret"),
        ("worker.resources.limits=null", "limits"),
        ("settings.batchInterval=0", "batchInterval"),
        ("networkPolicy.enabld=true", "enabld"),
        ("coordinator.strategy.type=RollingUpdate", "strategy"),
        ("worker.startupProbe.enable=true", "enable"),
        ("worker.startupProbe.successThreshold=2", "successThreshold"),
        ("networkPolicy.kafka.ports[0]=9092", "ports"),
        ("worker.ports.rpc=0", "rpc"),
    ],
)
def test_schema_rejects_bad_values(helm: str, override: str, message: str) -> None:
    out = _run([helm, "template", RELEASE, str(CHART), "--set", override])
    assert out.returncode != 0
    assert message in out.stderr


# --- optional features -------------------------------------------------------------------------


def _ci(name_part: str) -> Path:
    (path,) = [p for p in CI_FILES if name_part in p.name]
    return path


def test_network_policy_on_by_default_off_in_its_ci_file(helm: str) -> None:
    (np,) = _of_kind(_render(helm, None), "NetworkPolicy")
    assert _of_kind(_render(helm, _ci("no-networkpolicy")), "NetworkPolicy") == []
    spec = np["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    scrape_rule = next(r for r in spec["ingress"] if COORDINATOR_HTTP_PORT in _rule_ports(r))
    assert scrape_rule["from"][0]["namespaceSelector"]["matchLabels"]
    egress_ports = set().union(*(_rule_ports(r) for r in spec["egress"]))
    assert {53, KAFKA_DEFAULT_PORT, REDIS_DEFAULT_PORT} <= egress_ports


def test_network_policy_follows_the_configured_addresses(
    case: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RPC between fleet pods on the ports the processes listen on; egress to exactly the
    Kafka and Redis ports of the addresses the processes read (plus the extra ports)."""
    values, docs = case
    vals = _values(values)
    policies = _of_kind(docs, "NetworkPolicy")
    if not vals["networkPolicy"]["enabled"]:
        assert policies == []
        return
    (np,) = policies
    spec = np["spec"]
    fleet = [{"podSelector": spec["podSelector"]}]
    for wl in _workloads(docs):
        assert _matches(
            spec["podSelector"]["matchLabels"], wl["spec"]["template"]["metadata"]["labels"]
        )
    dep = _of_kind(docs, "Deployment")[0]
    sts = _of_kind(docs, "StatefulSet")[0]
    coord, _ = _process(monkeypatch, docs, dep, dep["spec"]["template"]["spec"]["containers"][0])
    worker, _ = _process(monkeypatch, docs, sts, sts["spec"]["template"]["spec"]["containers"][0])

    rpc = {_port(coord.coordinator), worker.rpc_port}
    http = {coord.http_port_for("coordinator"), worker.http_port_for("worker")}
    ingress = [_rule_ports(r) for r in spec["ingress"]]
    assert rpc in ingress
    assert spec["ingress"][ingress.index(rpc)]["from"] == fleet
    assert http in ingress
    to_fleet = [r for r in spec["egress"] if r.get("to") == fleet]
    assert [_rule_ports(r) for r in to_fleet] == [rpc]

    np_vals = vals["networkPolicy"]
    for name, ports in (
        ("kafka", _bootstrap_ports(worker.kafka_bootstrap)),
        ("redis", _redis_ports(worker.redis_url.get_secret_value())),
    ):
        assert coord.kafka_bootstrap == worker.kafka_bootstrap
        want = ports | set(np_vals[name]["extraPorts"])
        rules = [r for r in spec["egress"] if r is not to_fleet[0] and _rule_ports(r) & want]
        assert [_rule_ports(r) for r in rules] == [want], name
        assert rules[0].get("to", []) == np_vals[name]["to"], name
    # No rule of the chart allows everything (a rule with neither ports nor peers does).
    for rule in spec["egress"][: len(spec["egress"]) - len(np_vals["extraEgress"])]:
        assert rule.get("ports") or rule.get("to"), rule


def test_network_policy_egress_ports_are_derived(helm: str, tmp_path: Path) -> None:
    values = tmp_path / "addresses-values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap": " k0:19092, k1 ,[::1]:19093,SASL_SSL://k2:19094,k0:19092"},
                "redis": {"url": "rediss://user@cache.example/3"},
                "networkPolicy": {"kafka": {"extraPorts": [9094]}},
            }
        )
    )
    (np,) = _of_kind(_render(helm, values), "NetworkPolicy")
    egress = [_rule_ports(r) for r in np["spec"]["egress"]]
    assert {19092, KAFKA_DEFAULT_PORT, 19093, 19094, 9094} in egress
    assert {REDIS_DEFAULT_PORT} in egress

    (np,) = _of_kind(_render(helm, None, "redis.url=unix:///run/redis.sock"), "NetworkPolicy")
    egress = [_rule_ports(r) for r in np["spec"]["egress"]]
    assert {REDIS_DEFAULT_PORT} not in egress
    assert all(r.get("ports") or r.get("to") for r in np["spec"]["egress"])

    # ci/04: Kafka on 9093 and Redis over TLS on 6380 only, not the usual ports.
    (np,) = _of_kind(_render(helm, _ci("existing-secrets")), "NetworkPolicy")
    egress_ports = set().union(*(_rule_ports(r) for r in np["spec"]["egress"]))
    assert {9093, 6380} <= egress_ports
    assert not {KAFKA_DEFAULT_PORT, REDIS_DEFAULT_PORT} & egress_ports


def test_service_monitor_off_by_default_on_in_its_ci_file(helm: str) -> None:
    assert _of_kind(_render(helm, None), "ServiceMonitor") == []
    docs = _render(helm, _ci("servicemonitor"))
    (sm,) = _of_kind(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = sm["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "10s"
    selected = [
        s
        for s in _of_kind(docs, "Service")
        if _matches(spec["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    components = {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in selected}
    assert components == {"coordinator", "worker"}
    for s in selected:
        assert "http" in {p["name"] for p in s["spec"]["ports"]}


def test_prometheus_rule_off_by_default_on_in_its_ci_file(helm: str) -> None:
    """The PrometheusRule ships files/alerts.yaml as is (what promtool checks and tests in
    tests/unit/ops/test_alert_rules.py); only the runbook links get the configured prefix."""
    assert _of_kind(_render(helm, None), "PrometheusRule") == []
    assert _of_kind(_render(helm, _ci("servicemonitor")), "PrometheusRule") == []
    shipped = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    (plain,) = _of_kind(_render(helm, None, "prometheusRule.enabled=true"), "PrometheusRule")
    assert plain["spec"] == shipped
    (pr,) = _of_kind(_render(helm, _ci("alerts")), "PrometheusRule")
    assert pr["apiVersion"] == "monitoring.coreos.com/v1"
    assert pr["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = [r for g in pr["spec"]["groups"] for r in g["rules"]]
    want = [r for g in shipped["groups"] for r in g["rules"]]
    assert len(rules) == len(want) >= 9
    base = "https://git.example.com/dstream-fleet/blob/main/docs/operations.md#"
    for got, rule in zip(rules, want, strict=True):
        assert got["annotations"]["runbook_url"] == base + got["alert"].lower()
        assert {k: v for k, v in got.items() if k != "annotations"} == {
            k: v for k, v in rule.items() if k != "annotations"
        }


def test_standby_coordinator(helm: str) -> None:
    (dep,) = _of_kind(_render(helm, None), "Deployment")
    assert dep["spec"]["replicas"] == 1
    (dep,) = _of_kind(_render(helm, _ci("standby")), "Deployment")
    assert dep["spec"]["replicas"] == 2


def test_coordinator_is_recreated(case: Any) -> None:
    """Readiness means leading: a rolling update would wait forever for a new pod to be
    ready while the old one leads, so the old pods go first (the schema refuses others)."""
    _, docs = case
    (dep,) = _of_kind(docs, "Deployment")
    assert dep["spec"]["strategy"] == {"type": "Recreate"}


def test_grafana_dashboard_configmap(helm: str) -> None:
    docs = _render(helm, None)
    (cm,) = [d for d in _of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "dstream-fleet.json").read_text())
    assert json.loads(cm["data"]["dstream-fleet.json"]) == shipped
    off = _render(helm, _ci("no-pdb-no-dashboard"))
    assert not [d for d in off if d["metadata"]["name"].endswith("-dashboard")]
    assert _of_kind(off, "PodDisruptionBudget") == []
    assert _of_kind(off, "ServiceAccount") == []


def test_pdb_on_by_default(helm: str) -> None:
    (pdb,) = _of_kind(_render(helm, None), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_notes_name_the_addresses(helm: str, tmp_path: Path) -> None:
    # `helm install --dry-run` needs a cluster; render NOTES.txt through tpl in a copy instead.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{ dict "notes" (tpl (.Files.Get "notes.txt") .) | toYaml }}\n'
    )
    out = _run(
        [helm, "template", RELEASE, str(chart), "-n", NAMESPACE, "-s", "templates/zz-notes.yaml"]
    )
    assert out.returncode == 0, out.stderr
    notes = yaml.safe_load(out.stdout)["notes"]
    assert f"{RELEASE}-dstream-fleet-coordinator.{NAMESPACE}.svc:7070" in notes
    assert f"http://{RELEASE}-dstream-fleet-coordinator.{NAMESPACE}.svc:8080/metrics" in notes
    assert f"http://{RELEASE}-dstream-fleet-coordinator.{NAMESPACE}.svc:8080/" in notes
    assert ".svc:8081/metrics" in notes


# --- the docs match the chart and the code -------------------------------------------------------


def _doc_files() -> list[Path]:
    chart_text = [CHART / "values.yaml", CHART / "templates" / "NOTES.txt", *CI_FILES]
    return [*DOCS, *chart_text]


def _inline_code(markdown: str) -> list[str]:
    """Inline code spans of *markdown*, outside fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return re.findall(r"`([^`\n]+)`", prose)


def test_docs_name_only_settings_that_exist() -> None:
    fields = {f"DSTREAM_{name.upper()}" for name in Settings.model_fields}
    for path in _doc_files():
        for var in set(re.findall(r"DSTREAM_[A-Z0-9_]*[A-Z0-9]", path.read_text())):
            if var in NON_SETTING_VARS:
                assert var in NON_SETTING_VARS[var].read_text(), var
            else:
                assert var in fields, f"{path.name} names {var}, which is no setting"


def test_docs_name_only_metrics_that_exist() -> None:
    for path in DOCS:
        for name in set(re.findall(r"\bdstream_[a-z_]+[a-z]", path.read_text())):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in metrics.ALL_METRIC_NAMES, f"{path.name} names metric {name}"


def test_docs_name_only_endpoints_that_exist() -> None:
    http = (ROOT / "ops" / "http.py").read_text()
    ops_doc = DOCS[1].read_text()
    table = ops_doc[ops_doc.index("| path |") :].split("\n\n", 1)[0]
    paths = re.findall(r"^\| `(/[^`]*)`", table, flags=re.MULTILINE)
    assert {"/metrics", "/livez", "/readyz"} <= set(paths)
    for path in paths:
        assert f'"{path}"' in http, (
            f"operations.md documents {path}, ops/http.py serves no such path"
        )
    for path in DOCS:
        for code in _inline_code(path.read_text()):
            if re.fullmatch(r"/[a-z/]*", code) and not code.startswith(("/app", "/etc", "/tmp")):
                assert f'"{code}"' in http, f"{path.name}: {code}"


def test_docs_name_only_flags_that_exist() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {o for p in sub.choices.values() for a in p._actions for o in a.option_strings}
    for path in DOCS:
        for code in _inline_code(path.read_text()):
            if code.startswith(("helm ", "kubectl ")):
                continue
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", code):
                assert flag in flags, (
                    f"{path.name}: `{code}` names {flag}, no dstream command has it"
                )


def _documented_values_keys() -> set[str]:
    """The keys of the Values table in deploy.md, expanded: ``a.b.c``, ``.d`` or ``d`` (a
    sibling of the previous key), ``<role>.x`` (coordinator and worker)."""
    text = DOCS[0].read_text()
    table = text[text.index("| key | default | meaning |") :].split("\n\n", 1)[0]
    keys: set[str] = set()
    for row in table.splitlines()[2:]:
        previous = ""
        for i, token in enumerate(re.findall(r"`([^`]+)`", row.split("|")[1])):
            if "." in token.lstrip(".") or (i == 0 and not token.startswith(".")):
                key = token
            else:
                key = f"{previous.rpartition('.')[0]}.{token.lstrip('.')}".lstrip(".")
            previous = key
            for role in ("coordinator", "worker"):
                keys.add(key.replace("<role>", role))
    return keys


def _lookup(values: dict[str, Any], key: str) -> bool:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_values_table_matches_values_yaml() -> None:
    values = _values(None)
    documented = _documented_values_keys()
    missing = sorted(k for k in documented if not _lookup(values, k))
    assert not missing, f"deploy.md documents values that do not exist: {missing}"
    # And every value down to the second level is documented.
    for top, node in values.items():
        paths = [f"{top}.{sub}" for sub in node] if isinstance(node, dict) and node else [top]
        for p in paths:
            assert any(
                k == p or k.startswith(f"{p}.") or p.startswith(f"{k}.") for k in documented
            ), f"deploy.md's Values table does not document {p}"


def test_docs_name_the_generated_secret_key(helm: str) -> None:
    (secret,) = _of_kind(_render(helm, None), "Secret")
    (key,) = secret["data"]
    for path in DOCS[:2]:  # the operator's docs (architecture.md is about the code)
        text = path.read_text()
        assert "`shared-secret`" not in text or path.name == "deploy.md", path.name
        assert f"key `{key}`" in text, f"{path.name} does not name the generated key {key}"
