"""NetworkPolicy for the deployment test: rendered policies -> iptables in each pod's netns.

A CNI that enforces NetworkPolicy (Calico, Cilium) is what makes a wrong port in the chart
fatal: the policy opens only the ports the chart names, so a process listening elsewhere is
unreachable. :func:`pod_rules` turns the policies that select a pod into an
``iptables-restore`` script for that pod's network namespace; the emulator applies it after
every container start and again whenever the set of pods (their addresses) changes.

Semantics kept (networking.k8s.io/v1): a pod is isolated for ingress (egress) when any
policy of that type selects it; then only traffic some rule allows passes, replies to
allowed connections always pass (conntrack), and loopback is never filtered. Peers are
``podSelector`` (same namespace), ``namespaceSelector`` (+ optional ``podSelector``) and
``ipBlock`` (with ``except``); ports are numbers, ranges (``endPort``) or, for ingress,
names of the pod's own container ports. Traffic from the node (the podman network's
gateway: the kubelet's probes, host-side tools) is allowed in, as common CNIs do.
Not kept: named ports in egress rules (an error, so nothing passes unchecked), SCTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics; an empty selector matches everything."""
    if selector is None:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        has = key in labels
        if op == "In" and not (has and labels[key] in values):
            return False
        if op == "NotIn" and has and labels[key] in values:
            return False
        if op == "Exists" and not has:
            return False
        if op == "DoesNotExist" and has:
            return False
    return True


@dataclass(frozen=True)
class PodInfo:
    """What the policies need of a pod: its namespace, labels, address and named ports."""

    name: str
    namespace: str
    labels: Mapping[str, str]
    ip: str
    ports: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # name -> (proto, n)


def _peers(
    peers: Sequence[Mapping[str, Any]] | None,
    policy_ns: str,
    pods: Iterable[PodInfo],
    namespaces: Mapping[str, Mapping[str, str]],
) -> list[tuple[str, tuple[str, ...]]] | None:
    """CIDRs (with their exceptions) a rule's from/to allows; None means any address."""
    if not peers:
        return None
    out: list[tuple[str, tuple[str, ...]]] = []
    pods = list(pods)
    for peer in peers:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            out.append((block["cidr"], tuple(block.get("except") or ())))
            continue
        ns_sel = peer.get("namespaceSelector")
        pod_sel = peer.get("podSelector")
        for p in pods:
            if not p.ip:
                continue
            if ns_sel is None:
                in_ns = p.namespace == policy_ns
            else:
                in_ns = selector_matches(ns_sel, namespaces.get(p.namespace, {}))
            if in_ns and selector_matches(pod_sel, p.labels):
                out.append((f"{p.ip}/32", ()))
    return out


def _ports(
    ports: Sequence[Mapping[str, Any]] | None, own: Mapping[str, tuple[str, int]] | None
) -> list[tuple[str, str]] | None:
    """``(protocol, port-or-range)`` pairs a rule allows; None means every port."""
    if not ports:
        return None
    out: list[tuple[str, str]] = []
    for p in ports:
        proto = str(p.get("protocol", "TCP")).lower()
        port = p.get("port")
        if port is None:
            out.append((proto, ""))
        elif isinstance(port, str) and not port.isdigit():
            if own is None:
                msg = f"named port {port!r} in an egress rule is not emulated"
                raise NotImplementedError(msg)
            if port in own and own[port][0].lower() == proto:
                out.append((proto, str(own[port][1])))
            # a name the pod does not declare opens nothing, as in Kubernetes
        else:
            end = p.get("endPort")
            out.append((proto, f"{port}:{end}" if end else str(port)))
    return out


def pod_rules(
    pod: PodInfo,
    policies: Sequence[Mapping[str, Any]],
    pods: Iterable[PodInfo],
    gateway: str,
    namespaces: Mapping[str, Mapping[str, str]] | None = None,
) -> str | None:
    """The ``iptables-restore`` script (filter table) for *pod*; None when no policy selects it.

    Deterministic for given arguments, so callers can skip re-applying an unchanged script.
    """
    pods = list(pods)
    namespaces = namespaces or {
        p.namespace: {"kubernetes.io/metadata.name": p.namespace} for p in [pod, *pods]
    }
    selecting = [
        pol
        for pol in policies
        if pol["metadata"].get("namespace", "default") == pod.namespace
        and selector_matches(pol["spec"].get("podSelector") or {}, pod.labels)
    ]
    if not selecting:
        return None
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    chains: list[str] = []
    body: list[str] = []

    def emit(chain: str, direction: str, rule: Mapping[str, Any], peer_key: str, ns: str) -> None:
        cidrs = _peers(rule.get(peer_key), ns, pods, namespaces)
        ports = _ports(rule.get("ports"), pod.ports if direction == "in" else None)
        addr_flag = "-s" if direction == "in" else "-d"
        for cidr, excepts in cidrs if cidrs is not None else [("", ())]:
            target = "ACCEPT"
            if excepts:
                target = f"NP{len(chains)}"
                chains.append(target)
                body.extend(f"-A {target} {addr_flag} {e} -j RETURN" for e in excepts)
                body.append(f"-A {target} -j ACCEPT")
            for proto, port in ports if ports is not None else [("", "")]:
                m = f" {addr_flag} {cidr}" if cidr else ""
                if proto:
                    m += f" -p {proto}" + (f" -m {proto} --dport {port}" if port else "")
                body.append(f"-A {chain}{m} -j {target}")

    types = set()
    for pol in selecting:
        spec, ns = pol["spec"], pol["metadata"].get("namespace", "default")
        ptypes = spec.get("policyTypes") or (
            ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]
        )
        types.update(ptypes)
        if "Ingress" in ptypes:
            for rule in spec.get("ingress") or []:
                emit("INPUT", "in", rule, "from", ns)
        if "Egress" in ptypes:
            for rule in spec.get("egress") or []:
                emit("OUTPUT", "out", rule, "to", ns)
    head: list[str] = []
    if "Ingress" in types:
        head += [
            "-A INPUT -i lo -j ACCEPT",
            "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A INPUT -s {gateway}/32 -j ACCEPT",
        ]
    if "Egress" in types:
        head += [
            "-A OUTPUT -o lo -j ACCEPT",
            "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        ]
    tail = []
    if "Ingress" in types:
        tail.append("-A INPUT -j DROP")
    if "Egress" in types:
        tail.append("-A OUTPUT -j DROP")
    lines += [f":{c} - [0:0]" for c in chains]
    body_in = [r for r in body if r.startswith(("-A INPUT", "-A OUTPUT"))]
    body_chains = [r for r in body if not r.startswith(("-A INPUT", "-A OUTPUT"))]
    lines += head + body_chains + body_in + tail + ["COMMIT"]
    return "\n".join(lines) + "\n"
