"""The kubelet part of the deployment test's Kubernetes stand-in: one pod, one container.

A :class:`Pod` runs the rendered pod spec as a podman container: command and args, env
(values, ConfigMap and Secret keys, ``fieldRef`` metadata.name, metadata.namespace,
status.podIP, ``$(VAR)`` expansion), ``envFrom``, securityContext (user and group,
``runAsNonRoot``, read-only root filesystem, dropped capabilities, no-new-privileges),
volumes (ConfigMap and Secret as read-only files, emptyDir as a writable dir or a tmpfs),
httpGet startup, liveness and readiness probes from the node (the host) to the pod's
address with the rendered delays, periods, timeouts and thresholds; a failing liveness
or startup probe, or an exited container, restarts the container in the same pod
(same name, address and volumes); deletion is SIGTERM, ``terminationGracePeriodSeconds``,
then SIGKILL. Not emulated: resource limits (this machine's cgroup v1 has only the cpuset
controller), image pulls (``--pull never``), exec and tcpSocket probes (an error).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.deploy.netpol import PodInfo
from tests.deploy.podman import LABEL, labels, podman, rlimit_args

if TYPE_CHECKING:
    from tests.deploy.kube import Cluster, Workload

#: Crash-loop back-off of a container that exited: 1 s, doubling, at most 10 s (the
#: kubelet's is 10 s doubling to 5 min; shorter here so a test does not sleep for nothing).
BACKOFF_S, BACKOFF_MAX_S = 1.0, 10.0
DEFAULT_PROBE = {
    "initialDelaySeconds": 0,
    "periodSeconds": 10,
    "timeoutSeconds": 1,
    "successThreshold": 1,
    "failureThreshold": 3,
}


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, ``$$`` is a literal ``$``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


def mac_of(ip: str) -> str:
    """A locally administered MAC address made of an IPv4 address (``02:42:a:b:c:d``)."""
    return "02:42:" + ":".join(f"{int(x):02x}" for x in ip.split("."))


class Pod:
    """One pod: its container, its probes, its deletion. Methods are thread-safe.

    Lifecycle: ``Pending`` (volumes, container being created) -> ``Running`` ->
    ``Terminating`` -> ``Gone``. ``ready`` follows the readiness probe (no probe: ready
    once the container runs); a deleted pod is never ready.
    """

    def __init__(
        self,
        cluster: Cluster,
        name: str,
        owner: Workload,
        template: Mapping[str, Any],
        revision: str,
        extra_labels: Mapping[str, str],
    ) -> None:
        self.cluster, self.name, self.owner, self.revision = cluster, name, owner, revision
        self.namespace = owner.namespace
        meta = template.get("metadata") or {}
        self.labels: dict[str, str] = {**(meta.get("labels") or {}), **extra_labels}
        self.spec: dict[str, Any] = copy.deepcopy(template["spec"])
        if len(self.spec["containers"]) != 1 or self.spec.get("initContainers"):
            msg = f"{name}: the emulator runs exactly one container per pod"
            raise NotImplementedError(msg)
        self.c: dict[str, Any] = self.spec["containers"][0]
        self.hostname = name
        self.subdomain = owner.service_name
        self.ip = cluster.network.allocate()
        self.phase = "Pending"
        self.ready = False
        self.restarts = 0
        self.container = f"{cluster.prefix}-{name}"
        self.generation = 0  # bumped on every container (re)start; probes of older ones stop
        self.started_at = 0.0
        self.deleting = threading.Event()
        self.gone = threading.Event()
        self._lock = threading.RLock()
        self.grace = int(self.spec.get("terminationGracePeriodSeconds", 30))
        self.dir = cluster.workdir / "pods" / name
        self.rules_applied: str | None = None

    # ------------------------------------------------------------------ spec -> podman
    def ports(self) -> dict[str, tuple[str, int]]:
        """Named container ports: name -> (protocol, number)."""
        return {
            p["name"]: (p.get("protocol", "TCP"), int(p["containerPort"]))
            for p in self.c.get("ports") or []
            if "name" in p
        }

    def env(self) -> dict[str, str]:
        """The container's environment as the kubelet builds it (envFrom, then env)."""
        cl = self.cluster
        env: dict[str, str] = {}
        for src in self.c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            kind = "configMapRef" if "configMapRef" in src else "secretRef"
            try:
                data = (cl.config_map if kind == "configMapRef" else cl.secret)(
                    src[kind]["name"], self.namespace
                )
            except LookupError:
                if src[kind].get("optional"):
                    continue
                raise
            env.update({prefix + k: v for k, v in data.items()})
        for item in self.c.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = expand(str(item["value"]), env)
                continue
            ref = item.get("valueFrom") or {}
            if "configMapKeyRef" in ref or "secretKeyRef" in ref:
                kind = "configMapKeyRef" if "configMapKeyRef" in ref else "secretKeyRef"
                r = ref[kind]
                try:
                    data = (cl.config_map if kind == "configMapKeyRef" else cl.secret)(
                        r["name"], self.namespace
                    )
                    env[name] = data[r["key"]]
                except LookupError:  # a missing object or key stops the pod unless optional
                    if not r.get("optional"):
                        raise
            elif "fieldRef" in ref:
                path = ref["fieldRef"]["fieldPath"]
                fields = {
                    "metadata.name": self.name,
                    "metadata.namespace": self.namespace,
                    "status.podIP": self.ip,
                    "spec.nodeName": "node-0",
                    "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
                }
                if path not in fields:
                    msg = f"{self.name}: fieldRef {path} is not emulated"
                    raise NotImplementedError(msg)
                env[name] = fields[path]
            else:
                msg = f"{self.name}: env {name}: valueFrom {sorted(ref)} is not emulated"
                raise NotImplementedError(msg)
        return env

    def _security(self) -> list[str]:
        psc = self.spec.get("securityContext") or {}
        csc = self.c.get("securityContext") or {}
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot", False))
        args: list[str] = []
        if uid is None:
            image_user = self.cluster.image_user(self.c["image"])
            if non_root and not image_user.split(":")[0].isdigit():
                msg = f"{self.name}: runAsNonRoot with non-numeric image user {image_user!r}"
                raise RuntimeError(msg)
            uid = int(image_user.split(":")[0] or 0)
        if non_root and int(uid) == 0:
            msg = f"{self.name}: runAsNonRoot but the container would run as root"
            raise RuntimeError(msg)
        args += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
        if "fsGroup" in psc:
            args += ["--group-add", str(psc["fsGroup"])]
        for g in psc.get("supplementalGroups") or []:
            args += ["--group-add", str(g)]
        if csc.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if csc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if csc.get("privileged"):
            args.append("--privileged")
        caps = csc.get("capabilities") or {}
        args += [f"--cap-drop={c}" for c in caps.get("drop") or []]
        args += [f"--cap-add={c}" for c in caps.get("add") or []]
        return args

    def _volumes(self) -> list[str]:
        """Materialise the pod's volumes under its dir; return the mount options."""
        cl = self.cluster
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        sources: dict[str, Path | tuple[str, str]] = {}
        for vol in self.spec.get("volumes") or []:
            path = self.dir / "volumes" / vol["name"]
            if "configMap" in vol or "secret" in vol:
                kind = "configMap" if "configMap" in vol else "secret"
                src = vol[kind]
                ref = src.get("name") or src.get("secretName")
                data = (
                    cl.config_map(ref, self.namespace)
                    if kind == "configMap"
                    else cl.secret(ref, self.namespace)
                )
                mode = int(src.get("defaultMode", 0o644))
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                path.mkdir(parents=True, exist_ok=True)
                for it in items:
                    f = path / it["path"]
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_text(data[it["key"]])
                    os.chmod(f, int(it.get("mode", mode)))
                    if fs_group is not None:
                        os.chown(f, 0, int(fs_group))
            elif "emptyDir" in vol:
                ed = vol["emptyDir"] or {}
                if ed.get("medium") == "Memory":
                    sources[vol["name"]] = ("tmpfs", str(ed.get("sizeLimit", "")))
                    continue
                path.mkdir(parents=True, exist_ok=True)
                os.chmod(path, 0o777)  # the kubelet creates emptyDir world-writable
            else:
                msg = f"{self.name}: volume {vol['name']} of kind {sorted(vol)} is not emulated"
                raise NotImplementedError(msg)
            sources[vol["name"]] = path
        args: list[str] = []
        for m in self.c.get("volumeMounts") or []:
            src = sources[m["name"]]
            if isinstance(src, tuple):
                size = _bytes(src[1]) if src[1] else 0
                opts = "rw,mode=1777" + (f",size={size}" if size else "")
                args += ["--tmpfs", f"{m['mountPath']}:{opts}"]
                continue
            if m.get("subPath"):
                src = src / m["subPath"]
            vol = next(v for v in self.spec["volumes"] if v["name"] == m["name"])
            ro = m.get("readOnly") or "configMap" in vol or "secret" in vol
            args += ["-v", f"{src}:{m['mountPath']}:{'ro' if ro else 'rw'}"]
        return args

    def run_args(self) -> list[str]:
        """The ``podman run`` arguments of this pod's container (deterministic)."""
        env = self.env()
        args = ["run", "-d", "--name", self.container, *labels()]
        args += ["--label", f"{LABEL}.pod={self.name}", "--hostname", self.hostname]
        args += ["--network", self.cluster.network.name, "--ip", self.ip]
        # a MAC fixed by the address: a container restarted in place (or a new pod given a
        # freed address) keeps the MAC the host's neighbour table has for that address;
        # with a new random one, probes went to the old MAC until the entry went stale
        args += ["--mac-address", mac_of(self.ip)]
        args += ["--dns", self.cluster.network.gateway, "--dns-option", "ndots:5"]
        for d in (f"{self.namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local"):
            args += ["--dns-search", d]
        args += ["--pull", "never", "--stop-timeout", str(self.grace), *rlimit_args()]
        args += self._security() + self._volumes()
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        if self.c.get("workingDir"):
            args += ["--workdir", self.c["workingDir"]]
        command = [expand(str(x), env) for x in self.c.get("command") or []]
        cargs = [expand(str(x), env) for x in self.c.get("args") or []]
        if command:
            args += ["--entrypoint", json.dumps(command)]
        return [*args, self.c["image"], *cargs]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create the container and start its probes; called once, by the controller."""
        try:
            (self.dir / "volumes").mkdir(parents=True, exist_ok=True)
            podman(*self.run_args())
        except Exception as e:
            self.cluster.event(self.name, "create-failed", error=str(e))
            self.phase = "Failed"
            raise
        with self._lock:
            self.phase = "Running"
            self._started()
        self.cluster.event(self.name, "started", ip=self.ip, container=self.container)

    def _started(self) -> None:
        """A container (re)start: new generation, probe and exit watchers, policy rules."""
        self.generation += 1
        self.started_at = time.monotonic()
        self.ready = False
        self.rules_applied = None
        gen = self.generation
        self.cluster.apply_policy(self)
        threading.Thread(target=self._watch_exit, args=(gen,), daemon=True).start()
        threading.Thread(target=self._probe_loop, args=(gen,), daemon=True).start()

    def _watch_exit(self, gen: int) -> None:
        proc = podman("wait", "--interval", "300ms", self.container, check=False, timeout=10**6)
        with self._lock:
            if self.deleting.is_set() or gen != self.generation:
                return
            self.generation += 1  # probes of the dead container stop
            self.ready = False
        code = proc.stdout.strip()
        self.cluster.event(self.name, "container-exited", exit_code=code, restarts=self.restarts)
        delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** min(self.restarts, 8))
        if self.deleting.wait(delay):
            return
        self._restart("exited", stop=False)

    def _restart(self, reason: str, *, stop: bool) -> None:
        """Restart the container in place (same pod, address and volumes)."""
        with self._lock:
            if self.deleting.is_set():
                return
            self.generation += 1
            self.ready = False
            self.restarts += 1
        self.cluster.event(self.name, "restarting", reason=reason, restarts=self.restarts)
        if stop:
            podman(
                "stop", "-t", str(self.grace), self.container, check=False, timeout=self.grace + 60
            )
        podman("start", self.container, check=False)
        with self._lock:
            if not self.deleting.is_set():
                self._started()

    def _probe_loop(self, gen: int) -> None:
        """The kubelet's probe workers for one container start (generation *gen*)."""
        startup = self.c.get("startupProbe")
        probes = {k: self.c.get(k) for k in ("livenessProbe", "readinessProbe") if self.c.get(k)}
        if "readinessProbe" not in probes:
            self.ready = True
            self.cluster.endpoints_changed()
        state = {k: {"ok": 0, "fail": 0, "next": 0.0} for k in ["startupProbe", *probes]}
        started = startup is None
        t0 = self.started_at
        for k, p in [("startupProbe", startup or {}), *probes.items()]:
            state[k]["next"] = t0 + float({**DEFAULT_PROBE, **p}["initialDelaySeconds"])
        while gen == self.generation and not self.deleting.is_set():
            now = time.monotonic()
            active = ["startupProbe"] if not started else list(probes)
            due = [k for k in active if state[k]["next"] <= now]
            for k in due:
                p = {**DEFAULT_PROBE, **(startup if k == "startupProbe" else probes[k])}
                ok = self._probe(p)
                if gen != self.generation or self.deleting.is_set():
                    return
                st = state[k]
                st["next"] = time.monotonic() + float(p["periodSeconds"])
                st["ok"], st["fail"] = (st["ok"] + 1, 0) if ok else (0, st["fail"] + 1)
                if k == "startupProbe":
                    if ok:
                        started = True
                        for other in probes:
                            state[other]["next"] = time.monotonic()
                    elif st["fail"] >= int(p["failureThreshold"]):
                        threading.Thread(
                            target=self._restart,
                            args=("startup probe failed",),
                            kwargs={"stop": True},
                        ).start()
                        return
                elif k == "livenessProbe" and st["fail"] >= int(p["failureThreshold"]):
                    threading.Thread(
                        target=self._restart, args=("liveness probe failed",), kwargs={"stop": True}
                    ).start()
                    return
                elif k == "readinessProbe":
                    was = self.ready
                    if ok and st["ok"] >= int(p["successThreshold"]):
                        self.ready = True
                    elif not ok and st["fail"] >= int(p["failureThreshold"]):
                        self.ready = False
                    if was != self.ready:
                        self.cluster.event(self.name, "ready" if self.ready else "not-ready")
                        self.cluster.endpoints_changed()
            pending = [state[k]["next"] for k in (["startupProbe"] if not started else probes)]
            time.sleep(max(0.05, min([*pending, time.monotonic() + 1.0]) - time.monotonic()))

    def _probe(self, p: Mapping[str, Any]) -> bool:
        """One probe attempt from the node to the pod's address; True on success."""
        if "httpGet" not in p:
            msg = f"{self.name}: only httpGet probes are emulated, got {sorted(p)}"
            raise NotImplementedError(msg)
        h = p["httpGet"]
        port = h["port"]
        if isinstance(port, str) and not port.isdigit():
            if port not in self.ports():
                return False  # the kubelet cannot resolve the name: the probe fails
            port = self.ports()[port][1]
        scheme = str(h.get("scheme", "HTTP")).lower()
        url = f"{scheme}://{self.ip}:{port}{h.get('path', '/')}"
        try:
            with urllib.request.urlopen(url, timeout=float(p["timeoutSeconds"])) as r:
                return 200 <= r.status < 400
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def delete(self, grace: int | None = None) -> dict[str, Any]:
        """Delete the pod: out of endpoints at once, SIGTERM, *grace* s, SIGKILL, removed.

        ``grace=0`` is ``kubectl delete --grace-period=0 --force`` (SIGKILL at once).
        Blocks until the container is gone; returns what happened (seconds, exit code,
        whether SIGKILL was needed). Idempotent: a second call waits for the first.
        """
        grace = self.grace if grace is None else grace
        with self._lock:
            if self.deleting.is_set():
                self.gone.wait()
                return {}
            self.deleting.set()
            self.ready = False
            self.phase = "Terminating"
        self.cluster.endpoints_changed()
        t0 = time.monotonic()
        if grace == 0:
            podman("kill", "-s", "KILL", self.container, check=False)
        else:
            podman("stop", "-t", str(grace), self.container, check=False, timeout=grace + 60)
        took = time.monotonic() - t0
        state = podman(
            "inspect", "-f", "{{.State.ExitCode}}", self.container, check=False
        ).stdout.strip()
        self.save_logs()
        podman("rm", "-f", "-t", "0", self.container, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.cluster.network.release(self.ip)
        self.phase = "Gone"
        self.gone.set()
        killed = grace == 0 or state == "137" or took >= grace
        result = {"seconds": round(took, 2), "exit_code": state, "sigkill": killed}
        self.cluster.event(self.name, "deleted", grace=grace, **result)
        return result

    def save_logs(self) -> Path:
        """Append the container's output to ``<workdir>/logs/<pod>.log``; return the path."""
        out = self.cluster.workdir / "logs" / f"{self.name}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = podman("logs", self.container, check=False)
        with out.open("a") as f:
            f.write(f"===== {self.container} (restarts {self.restarts})\n")
            f.write(proc.stdout + proc.stderr)
        return out

    def logs(self) -> str:
        proc = podman("logs", self.container, check=False)
        return proc.stdout + proc.stderr

    def info(self) -> PodInfo:
        return PodInfo(self.name, self.namespace, self.labels, self.ip, self.ports())


def _bytes(q: str) -> int:
    """A Kubernetes quantity (``256Mi``, ``1G``, ``512``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for u, f in units.items():
        if q.endswith(u):
            return int(float(q[: -len(u)]) * f)
    return int(q)
