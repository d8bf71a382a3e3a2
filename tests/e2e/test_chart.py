"""The Helm chart: lint, render with every ci values file, validate against Kubernetes schemas.

helm is built by ``make setup`` (``ops/devkit/install_helm.sh``); it is found through
``$DSTREAM_HELM``, the build's cache dir, then ``PATH``. Without it these tests FAIL: the
chart is part of the product and must not silently go untested.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

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
CRD_KINDS = {"ServiceMonitor"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


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
            "helm not found: run `make setup` (or `bash ops/devkit/install_helm.sh`), "
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
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"rpc": 7070, "http": 8080}

    settings_name = f"{RELEASE}-dstream-fleet-settings"
    settings = _one(docs, "ConfigMap", settings_name)["data"]
    for wl in _workloads(docs):
        for c in _containers(wl):
            assert {"configMapRef": {"name": settings_name}} in c["envFrom"]
    assert settings["DSTREAM_COORDINATOR"] == f"{svc['metadata']['name']}.{NAMESPACE}.svc:7070"
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
    for wl in _workloads(_render(helm, None)):
        labels = wl["spec"]["template"]["metadata"]["labels"]
        assert _matches(spec["podSelector"]["matchLabels"], labels)
    ingress_ports = [{p["port"] for p in rule["ports"]} for rule in spec["ingress"]]
    assert {7070, 7071} in ingress_ports
    assert {8080, 8081} in ingress_ports
    rpc_rule = spec["ingress"][ingress_ports.index({7070, 7071})]
    assert rpc_rule["from"] == [{"podSelector": spec["podSelector"]}]
    scrape_rule = spec["ingress"][ingress_ports.index({8080, 8081})]
    assert scrape_rule["from"][0]["namespaceSelector"]["matchLabels"]
    egress_ports = set()
    for rule in spec["egress"]:
        egress_ports |= {p["port"] for p in rule["ports"]}
    assert {53, 6379, 9092, 7070, 7071} <= egress_ports


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


def test_standby_coordinator(helm: str) -> None:
    (dep,) = _of_kind(_render(helm, _ci("standby")), "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["type"] == "Recreate"


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
