"""The emulator itself: DNS packets, ``$(VAR)``, NetworkPolicy rules, and one real pod."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.dns import TYPE_A, TYPE_AAAA, ClusterDns, answer
from tests.deploy.kube import Cluster
from tests.deploy.kubelet import expand
from tests.deploy.netpol import PodInfo, pod_rules, selector_matches
from tests.deploy.podman import PodNetwork, podman, rlimit_args


def _query(name: str, qtype: int = TYPE_A, qid: int = 7) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def test_dns_answers_a_records_and_nxdomain() -> None:
    table = {"svc.default.svc.cluster.local": ["10.0.0.5", "10.0.0.6"]}
    r = answer(_query("svc.default.svc.cluster.local"), table)
    qid, flags, _qd, an = struct.unpack("!HHHH", r[:8])
    assert (qid, flags & 0xF, an) == (7, 0, 2)
    assert r.endswith(socket.inet_aton("10.0.0.6"))
    r = answer(_query("svc.default.svc.cluster.local", TYPE_AAAA), table)
    assert struct.unpack("!HHHH", r[:8])[1] & 0xF == 0 and r[6:8] == b"\0\0"
    r = answer(_query("other.default.svc.cluster.local"), table)
    assert struct.unpack("!HH", r[:4])[1] & 0xF == 3  # NXDOMAIN


def test_dns_server_serves_the_current_table() -> None:
    dns = ClusterDns("127.0.0.1", 0)
    dns.port = dns._sock.getsockname()[1]
    dns.start()
    try:
        dns.set_records({"a.b.svc.cluster.local": ["10.1.2.3"]})
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(_query("a.b.svc.cluster.local"), ("127.0.0.1", dns.port))
            assert s.recv(512).endswith(socket.inet_aton("10.1.2.3"))
            dns.set_records({})
            s.sendto(_query("a.b.svc.cluster.local"), ("127.0.0.1", dns.port))
            assert struct.unpack("!HH", s.recv(512)[:4])[1] & 0xF == 3
    finally:
        dns.close()


def test_expand_follows_kubernetes_rules() -> None:
    env = {"POD_NAME": "w-0", "NS": "default"}
    assert expand("$(POD_NAME).svc.$(NS).svc", env) == "w-0.svc.default.svc"
    assert expand("$(MISSING)-$$(POD_NAME)", env) == "$(MISSING)-$(POD_NAME)"


def test_selector_semantics() -> None:
    labels = {"app": "x", "tier": "w"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchLabels": {"app": "x"}}, labels)
    assert not selector_matches({"matchLabels": {"app": "y"}}, labels)
    expr = {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["w"]}]}
    assert selector_matches(expr, labels)
    expr = {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}
    assert not selector_matches(expr, labels)


def test_policy_opens_only_the_named_ports_to_selected_peers() -> None:
    me = PodInfo("w-0", "default", {"app": "x"}, "10.0.0.10", {"http": ("TCP", 8081)})
    peer = PodInfo("c-0", "default", {"app": "x"}, "10.0.0.11")
    stranger = PodInfo("s-0", "default", {"app": "y"}, "10.0.0.12")
    policy = {
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "x"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "x"}}}],
                    "ports": [{"port": 7071, "protocol": "TCP"}, {"port": "http"}],
                }
            ],
            "egress": [{"ports": [{"port": 9092, "protocol": "TCP"}]}],
        },
    }
    rules = pod_rules(me, [policy], [me, peer, stranger], "10.0.0.1")
    assert rules is not None
    lines = rules.splitlines()
    assert "-A INPUT -s 10.0.0.11/32 -p tcp -m tcp --dport 7071 -j ACCEPT" in lines
    assert "-A INPUT -s 10.0.0.11/32 -p tcp -m tcp --dport 8081 -j ACCEPT" in lines
    assert not any("10.0.0.12" in line for line in lines)
    assert "-A INPUT -s 10.0.0.1/32 -j ACCEPT" in lines  # the node's probes
    assert "-A OUTPUT -p tcp -m tcp --dport 9092 -j ACCEPT" in lines
    assert lines[-3:] == ["-A INPUT -j DROP", "-A OUTPUT -j DROP", "COMMIT"]
    assert pod_rules(stranger, [policy], [me, peer, stranger], "10.0.0.1") is None


# ---------------------------------------------------------------- the kubelet, for real
_PROBE = {"initialDelaySeconds": 0, "periodSeconds": 1, "timeoutSeconds": 1}


def _probe_pod_manifests(image: str) -> list[dict[str, Any]]:
    """A Deployment whose container serves /tmp/www over HTTP: /ok answers, /livez does not
    (until the test creates it); PID 1 is a shell that ignores SIGTERM, as a process that
    installs no handler does as PID 1."""
    script = (
        "mkdir -p /tmp/www && cd /tmp/www && echo ok > ok && "
        'echo "$GREETING" > greeting && cp /cfg/app.txt . && '
        "trap '' TERM; python3 -m http.server 8000 & while :; do wait; done"
    )
    labels = {"app": "probe"}
    container = {
        "name": "c",
        "image": image,
        "command": ["sh", "-c", script],
        "ports": [{"name": "http", "containerPort": 8000}],
        "env": [
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GREETING", "value": "hi $(POD) at $(IP)"},
        ],
        "securityContext": {
            "runAsUser": 10001,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "readinessProbe": {"httpGet": {"path": "/ok", "port": "http"}, **_PROBE},
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "http"},
            **_PROBE,
            "initialDelaySeconds": 3,
            "failureThreshold": 2,
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cfg", "mountPath": "/cfg"},
        ],
    }
    return [
        {"kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"app.txt": "from-configmap"}},
        {
            "kind": "Service",
            "metadata": {"name": "probe"},
            "spec": {"selector": labels, "ports": [{"port": 8000, "targetPort": "http"}]},
        },
        {
            "kind": "Deployment",
            "metadata": {"name": "probe"},
            "spec": {
                "replicas": 1,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 2,
                        "containers": [container],
                        "volumes": [
                            {"name": "tmp", "emptyDir": {}},
                            {"name": "cfg", "configMap": {"name": "cfg"}},
                        ],
                    },
                },
            },
        },
    ]


@pytest.mark.timeout(240)
def test_kubelet_probes_restarts_security_and_termination(
    image: str, network: PodNetwork, tmp_path: Path
) -> None:
    """Readiness gates the Service name, a failing liveness probe restarts the container in
    place, the securityContext holds inside it, and deletion escalates to SIGKILL."""
    cluster = Cluster(_probe_pod_manifests(image), network, tmp_path).install()
    try:
        w = cluster.workload("Deployment")
        cluster.wait(lambda: any(p.ready for p in cluster.running()), 60, "a ready pod")
        pod = cluster.running()[0]
        cluster.wait(lambda: cluster.resolve("probe") == [pod.ip], 5, "the Service name")

        def sh(cmd: str) -> str:
            return podman("exec", pod.container, "sh", "-c", cmd).stdout.strip()

        assert sh("id -u") == "10001"
        assert sh("cat /tmp/www/greeting") == f"hi {pod.name} at {pod.ip}"
        assert sh("cat /tmp/www/app.txt") == "from-configmap"
        assert podman("exec", pod.container, "touch", "/x", check=False).returncode != 0
        status = sh("cat /proc/1/status")
        assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
        # /livez is missing: liveness fails twice, the container restarts in the same pod
        cluster.wait(lambda: pod.restarts >= 1, 30, "a liveness restart")
        cluster.wait(lambda: pod.ready, 30, "ready again after the restart")
        assert cluster.running() == [pod] and w.replicas == 1
        assert any(
            e.what == "restarting" and "liveness" in e.detail["reason"] for e in cluster.events
        )
        sh("echo alive > /tmp/www/livez")  # emptyDir survived the restart; now it stays up
        restarts = pod.restarts
        time.sleep(4)
        assert pod.restarts == restarts
        # delete: out of the Service at once, SIGTERM ignored, SIGKILL after the 2 s grace
        result = cluster.delete_pod(pod.name)
        assert result["sigkill"] and 1.5 <= result["seconds"] < 10, result
        assert pod.ip not in cluster.resolve("probe")
        cluster.wait(
            lambda: any(p.name != pod.name and p.ready for p in cluster.running()),
            60,
            "the Deployment's replacement pod",
        )
        new = cluster.running()[0]
        assert new.name.rsplit("-", 1)[0] == pod.name.rsplit("-", 1)[0] and new.name != pod.name
    finally:
        cluster.close()


def test_the_image_ships_the_runtime_without_the_tooling(image: str) -> None:
    """``dstream`` in the image has the roles' commands only; ``ops.tools`` is not there."""
    run = ["run", "--rm", *rlimit_args(), "--network", "none", image]
    helped = podman(*run, "--help").stdout
    assert "coordinator" in helped and "worker" in helped, helped
    for tool in ("produce", "verify", "dev", "run"):
        assert f"\n    {tool} " not in helped, (tool, helped)
    probe = "import importlib.util as u; print(u.find_spec('ops.tools'), u.find_spec('ops.worker'))"
    out = podman(*run[:-1], "--entrypoint", "python3", image, "-c", probe).stdout.split()
    assert out[0] == "None" and out[1] != "None", out
