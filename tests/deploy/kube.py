"""A small Kubernetes stand-in: the rendered chart's pods as real podman containers.

It plays the parts of a cluster that decide whether a deployed fleet works, and no more:

* **kubelet** (:class:`tests.deploy.kubelet.Pod`): one container per pod, from the
  rendered pod spec (command, args, env, envFrom, securityContext, volumes, probes,
  ``terminationGracePeriodSeconds``; see that module);
* **controllers** (:class:`Cluster`): a Deployment keeps its replicas (a recreated pod
  gets a new random suffix), a StatefulSet keeps ``<name>-<ordinal>`` pods (Parallel or
  OrderedReady), scales down from the highest ordinal and rolls out a new template one
  pod at a time from the highest ordinal, each time waiting for the whole set to be ready;
* **endpoints and DNS** (:mod:`tests.deploy.dns`): a Service name resolves to the
  addresses of the ready pods it selects whose container declares the Service's target
  port; a headless Service with ``publishNotReadyAddresses`` publishes
  ``<pod>.<svc>.<ns>.svc`` at once;
* **a NetworkPolicy-enforcing CNI** (:mod:`tests.deploy.netpol`).

Every pod has its own address on one podman network (netavark, no aardvark: the cluster
DNS above answers instead). Not emulated: ClusterIP virtual addresses (a Service name
resolves straight to its pods, so a Service whose ``port`` differs from its target port is
refused rather than silently mis-served), Service environment links, PodDisruptionBudget
admission (the tests check its bound themselves), nodes and scheduling.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import random
import string
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.dns import ClusterDns
from tests.deploy.kubelet import Pod
from tests.deploy.netpol import pod_rules, selector_matches
from tests.deploy.podman import PodNetwork, podman

log = logging.getLogger("kube")

#: How often the controllers reconcile and the endpoints are recomputed; a kube controller
#: reacts within a fraction of a second of a watch event.
RECONCILE_S = 0.3


def load_manifests(text: str) -> list[dict[str, Any]]:
    """The objects of a ``helm template`` output, in order (empty documents dropped)."""
    return [d for d in yaml.safe_load_all(text) if d]


@dataclass
class Event:
    """Something the emulator did or saw, with its time (monotonic) for the test report."""

    at: float
    pod: str
    what: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workload:
    """A Deployment or StatefulSet as the controllers see it (spec is mutable: scale, restart)."""

    kind: str
    name: str
    namespace: str
    spec: dict[str, Any]

    @property
    def replicas(self) -> int:
        return int(self.spec.get("replicas", 1))

    @property
    def service_name(self) -> str | None:
        return self.spec.get("serviceName") if self.kind == "StatefulSet" else None

    def revision(self) -> str:
        raw = json.dumps(self.spec["template"], sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:10]


class Cluster:
    """The rendered chart, running: ConfigMaps, Secrets, Services, workloads, policies.

    Create, then :meth:`install`; :meth:`close` deletes every pod (graceful) and stops the
    DNS. Pods are created and deleted on background threads, as controllers do.
    """

    def __init__(
        self, manifests: Iterable[Mapping[str, Any]], network: PodNetwork, workdir: Path
    ) -> None:
        self.objects = [copy.deepcopy(dict(o)) for o in manifests]
        self.network = network
        self.workdir = workdir
        self.prefix = f"{network.name}-pod"
        self.events: list[Event] = []
        self.pods: dict[str, Pod] = {}
        self.lock = threading.RLock()
        self.workloads = [
            Workload(o["kind"], o["metadata"]["name"], _ns(o), o["spec"])
            for o in self.objects
            if o["kind"] in ("Deployment", "StatefulSet")
        ]
        self.dns = ClusterDns(network.gateway)
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._image_users: dict[str, str] = {}
        self._busy: set[str] = set()  # StatefulSet pod names with a create/delete in flight
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ objects
    def _get(self, kind: str, name: str, ns: str) -> dict[str, Any]:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name and _ns(o) == ns:
                return o
        msg = f"{kind} {ns}/{name} is not in the rendered chart (the pod would not start)"
        raise LookupError(msg)

    def config_map(self, name: str, ns: str) -> dict[str, str]:
        return {k: str(v) for k, v in (self._get("ConfigMap", name, ns).get("data") or {}).items()}

    def secret(self, name: str, ns: str) -> dict[str, str]:
        s = self._get("Secret", name, ns)
        out = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
        out.update({k: str(v) for k, v in (s.get("stringData") or {}).items()})
        return out

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def workload(self, kind: str, name: str | None = None) -> Workload:
        return next(w for w in self.workloads if w.kind == kind and name in (None, w.name))

    def image_user(self, image: str) -> str:
        if image not in self._image_users:
            out = podman("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip()
            self._image_users[image] = out
        return self._image_users[image]

    def event(self, pod: str, what: str, **detail: Any) -> None:
        e = Event(time.monotonic(), pod, what, detail)
        self.events.append(e)
        log.info("%7.2fs %s %s %s", e.at - self.t0, pod, what, detail or "")

    # ------------------------------------------------------------------ control loop
    def install(self) -> Cluster:
        """Start the DNS and the controllers; the workloads' pods start in the background."""
        for svc in self.of_kind("Service"):
            self._check_service_ports(svc)
        self.dns.start()
        threading.Thread(target=self._control_loop, name="controllers", daemon=True).start()
        return self

    def _check_service_ports(self, svc: Mapping[str, Any]) -> None:
        for p in svc["spec"].get("ports") or []:
            target = p.get("targetPort", p["port"])
            if isinstance(target, int) and target != p["port"]:
                msg = f"Service {svc['metadata']['name']}: port {p['port']} -> {target} needs a VIP"
                raise NotImplementedError(msg)

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                for w in self.workloads:
                    self._reconcile(w)
                self._update_endpoints()
                self._update_policies()
            except Exception:
                log.exception("controller loop")
            self._dirty.wait(RECONCILE_S)
            self._dirty.clear()

    def endpoints_changed(self) -> None:
        self._dirty.set()

    def owned(self, w: Workload) -> list[Pod]:
        with self.lock:
            return [p for p in self.pods.values() if p.owner is w]

    def _spawn(self, w: Workload, name: str, labels: Mapping[str, str]) -> None:
        pod = Pod(self, name, w, w.spec["template"], w.revision(), labels)
        with self.lock:
            self.pods[name] = pod
            self._busy.add(name)

        def run() -> None:
            try:
                pod.start()
            except Exception:
                log.exception("pod %s did not start", name)
            finally:
                with self.lock:
                    self._busy.discard(name)
                self._dirty.set()

        threading.Thread(target=run, name=f"create-{name}", daemon=True).start()

    def _delete_async(self, pod: Pod, grace: int | None = None) -> None:
        def run() -> None:
            pod.delete(grace)
            with self.lock:
                if self.pods.get(pod.name) is pod:
                    del self.pods[pod.name]
            self._dirty.set()

        threading.Thread(target=run, name=f"delete-{pod.name}", daemon=True).start()

    def _reconcile(self, w: Workload) -> None:
        pods = [p for p in self.owned(w) if not p.deleting.is_set()]
        if w.kind == "Deployment":
            for _ in range(w.replicas - len(pods)):
                suffix = "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
                rev = w.revision()
                self._spawn(w, f"{w.name}-{rev}-{suffix}", {"pod-template-hash": rev})
            for p in sorted(pods, key=lambda p: p.started_at)[w.replicas :][::-1]:
                self._delete_async(p)
            return
        # StatefulSet
        ordered = w.spec.get("podManagementPolicy", "OrderedReady") == "OrderedReady"
        names = {p.name: p for p in self.owned(w)}  # terminating ones hold their name
        for i in range(w.replicas):
            name = f"{w.name}-{i}"
            if name in names:
                if ordered and not names[name].ready:
                    break
                continue
            self._spawn(
                w,
                name,
                {
                    "statefulset.kubernetes.io/pod-name": name,
                    "apps.kubernetes.io/pod-index": str(i),
                    "controller-revision-hash": w.revision(),
                },
            )
            if ordered:
                break
        extra = sorted(
            (p for p in pods if _ordinal(p.name) >= w.replicas), key=lambda p: -_ordinal(p.name)
        )
        for p in extra[:1] if ordered else extra:
            self._delete_async(p)
        # RollingUpdate: with every pod up and ready, replace the highest old-revision one
        rev = w.revision()
        current = [p for p in pods if _ordinal(p.name) < w.replicas]
        stale = [p for p in current if p.revision != rev]
        strategy = (w.spec.get("updateStrategy") or {}).get("type", "RollingUpdate")
        if (
            stale
            and strategy == "RollingUpdate"
            and len(current) == w.replicas
            and all(p.ready for p in current)
            and not any(p.deleting.is_set() for p in self.owned(w))
        ):
            victim = max(stale, key=lambda p: _ordinal(p.name))
            self.event(victim.name, "rolling-update", revision=rev)
            self._delete_async(victim)

    def _update_endpoints(self) -> None:
        records: dict[str, list[str]] = {}
        with self.lock:
            pods = [p for p in self.pods.values() if p.phase == "Running"]
        for svc in self.of_kind("Service"):
            spec, name, ns = svc["spec"], svc["metadata"]["name"], _ns(svc)
            sel = spec.get("selector")
            if not sel:
                continue
            publish_all = bool(spec.get("publishNotReadyAddresses"))
            members = []
            for p in pods:
                if p.namespace != ns or not selector_matches({"matchLabels": sel}, p.labels):
                    continue
                if p.deleting.is_set() or not (p.ready or publish_all):
                    continue
                if not all(_target_declared(sp, p) for sp in spec.get("ports") or []):
                    continue  # no endpoint port for this pod: traffic to it goes nowhere
                members.append(p)
            fqdn = f"{name}.{ns}.svc.cluster.local"
            records[fqdn] = sorted(p.ip for p in members)
            if spec.get("clusterIP") == "None":
                for p in members:
                    if p.subdomain == name:
                        records[f"{p.hostname}.{fqdn}"] = [p.ip]
        self.dns.set_records(records)

    def _update_policies(self) -> None:
        with self.lock:
            pods = [p for p in self.pods.values() if p.phase == "Running"]
        for p in pods:
            self.apply_policy(p, pods)

    def apply_policy(self, pod: Pod, pods: list[Pod] | None = None) -> None:
        """Load the NetworkPolicy rules for *pod* into its netns (no-op when unchanged)."""
        if pods is None:
            with self.lock:
                pods = [p for p in self.pods.values() if p.phase in ("Running", "Pending")]
        policies = self.of_kind("NetworkPolicy")
        rules = pod_rules(
            pod.info(), policies, [p.info() for p in pods if p.ip], self.network.gateway
        )
        if rules is None or rules == pod.rules_applied or pod.deleting.is_set():
            return
        pid = podman("inspect", "-f", "{{.State.Pid}}", pod.container, check=False).stdout.strip()
        if not pid.isdigit() or pid == "0":
            return
        proc = subprocess.run(
            ["nsenter", "-t", pid, "-n", "iptables-restore"],
            input=rules,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            msg = f"{pod.name}: iptables-restore failed: {proc.stderr}\n{rules}"
            raise RuntimeError(msg)
        pod.rules_applied = rules

    # ------------------------------------------------------------------ operations
    def running(self, component: str | None = None) -> list[Pod]:
        """Pods not being deleted (optionally of one ``app.kubernetes.io/component``)."""
        with self.lock:
            pods = list(self.pods.values())
        return sorted(
            (
                p
                for p in pods
                if not p.deleting.is_set()
                and (component is None or p.labels.get("app.kubernetes.io/component") == component)
            ),
            key=lambda p: p.name,
        )

    def pod(self, name: str) -> Pod:
        with self.lock:
            return self.pods[name]

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll *cond* until true; return the seconds it took; raise with *what* on timeout."""
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                msg = f"timed out after {timeout:.0f} s waiting for {what}; {self.describe()}"
                raise TimeoutError(msg)
            time.sleep(0.2)
        return time.monotonic() - t0

    def wait_ready(self, w: Workload, timeout: float = 120) -> float:
        """Wait until *w* has exactly its replicas, all at its revision, ready, none leaving."""

        def done() -> bool:
            pods = self.owned(w)
            return (
                len(pods) == w.replicas
                and all(p.ready and not p.deleting.is_set() for p in pods)
                and all(p.revision == w.revision() for p in pods)
            )

        return self.wait(done, timeout, f"{w.kind} {w.name} ready")

    def scale(self, w: Workload, replicas: int) -> None:
        w.spec["replicas"] = replicas
        self._dirty.set()

    def rollout_restart(self, w: Workload) -> None:
        """``kubectl rollout restart``: a new template revision, rolled out by the controller."""
        meta = w.spec["template"].setdefault("metadata", {})
        meta.setdefault("annotations", {})["kubectl.kubernetes.io/restartedAt"] = str(time.time())
        self._dirty.set()

    def delete_pod(self, name: str, grace: int | None = None) -> dict[str, Any]:
        """``kubectl delete pod`` (blocking); the owner's controller then replaces it."""
        pod = self.pod(name)
        result = pod.delete(grace)
        with self.lock:
            if self.pods.get(name) is pod:
                del self.pods[name]
        self._dirty.set()
        return result

    def resolve(self, name: str) -> list[str]:
        """What a pod's resolver gets for *name* (tries the pods' search path)."""
        table = self.dns.records()
        for suffix in ("", ".default.svc.cluster.local", ".svc.cluster.local", ".cluster.local"):
            if (name + suffix) in table:
                return list(table[name + suffix])
        return []

    def describe(self) -> str:
        with self.lock:
            pods = list(self.pods.values())
        rows = [
            f"{p.name}({p.phase},{'ready' if p.ready else 'not-ready'},ip={p.ip},"
            f"restarts={p.restarts})"
            for p in sorted(pods, key=lambda p: p.name)
        ]
        return "pods: " + ", ".join(rows)

    def close(self) -> None:
        """Delete every pod (workloads to zero replicas first) and stop the DNS."""
        for w in self.workloads:
            w.spec["replicas"] = 0
        self._stop.set()
        with self.lock:
            pods = list(self.pods.values())
        threads = [threading.Thread(target=p.delete) for p in pods]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        self.dns.close()


def _ns(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"].get("namespace") or "default")


def _ordinal(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def _target_declared(service_port: Mapping[str, Any], pod: Pod) -> bool:
    """True when the pod declares the Service port's target (a name, or a number)."""
    target = service_port.get("targetPort", service_port["port"])
    if isinstance(target, str) and not target.isdigit():
        return target in pod.ports()
    return True  # a numeric target needs no declaration, as in Kubernetes


def random_name(n: int = 6) -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=n))
