"""The chart with each file of helm/dstream-fleet/ci/ that needs nothing outside the cluster.

Each values file is installed on its own (its own release, app id and topics), fed a short
input, and checked exactly with ``dstream verify``, plus what the file changes:

* 01-standby: two coordinator pods, exactly one ready (the leader), and the coordinator
  Service name resolves to the leader only;
* 06-existing-configmap: the app comes from a ConfigMap created beside the chart, under
  the key the values name;
* 08-tuned: with 3 workers instead of 6 (a 2-core machine), its startupProbe in force;
* 03-tls: the certificate Secret it names is created beside the chart (one CA, one
  certificate for the fleet, as cert-manager would issue); every RPC connection is mutual
  TLS: a plaintext client and a client with another CA's certificate get no answer from
  the coordinator, a client with the fleet's certificate does;
* 09-custom-ports: every role listens on the non-default ports the values give.

Not here: 04-existing-secrets (Kafka and Redis addresses and secrets of another cluster).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import tlskit
from tests.deploy import infra
from tests.deploy.conftest import OUT_DIR, check_verify, finish_producer, install
from tests.deploy.podman import PodNetwork

CI = infra.CHART / "ci"
APP_SOURCE = (infra.ROOT / "examples" / "pageviews.py").read_text()
_CA = tlskit.make_ca("dstream-deploy-test-ca")
_LEAF = tlskit.make_leaf(_CA, "dstream-fleet")
CASES: dict[str, dict[str, Any]] = {
    "01-standby": {},
    "02-servicemonitor": {},
    "03-tls": {
        "objects": [
            {
                "kind": "Secret",
                "metadata": {"name": "dstream-fleet-rpc-tls", "namespace": "default"},
                "stringData": {
                    "tls.crt": _LEAF.pem.decode(),
                    "tls.key": _LEAF.key_pem.decode(),
                    "ca.crt": _CA.pem.decode(),
                },
            }
        ]
    },
    "05-no-networkpolicy": {},
    "06-existing-configmap": {
        "objects": [
            {
                "kind": "ConfigMap",
                "metadata": {"name": "page-views-app", "namespace": "default"},
                "data": {"pipeline.py": APP_SOURCE},
            }
        ]
    },
    "07-no-pdb-no-dashboard": {},
    "08-tuned": {"sets": {"worker.replicas": "3"}},
    "09-custom-ports": {},
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", sorted(CASES))
def test_values_file_runs(
    case: str, image: str, helm: str, network: PodNetwork, kafka: str, redis_url: str
) -> None:
    spec: Mapping[str, Any] = CASES[case]
    n = case.split("-", 1)[0]
    with install(
        image=image,
        helm=helm,
        network=network,
        kafka=kafka,
        redis_url=redis_url,
        release=f"ci{n}",
        topics=(f"pageviews-ci{n}", f"pageview-counts-ci{n}"),
        values=[CI / f"{case}-values.yaml"],
        sets=spec.get("sets"),
        objects=spec.get("objects", ()),
        out=OUT_DIR / f"ci-{case}",
    ) as fleet:
        cluster = fleet.cluster
        coords = fleet.coordinators
        ready = [p for p in coords if p.ready]
        svc = next(
            o["metadata"]["name"]
            for o in cluster.of_kind("Service")
            if o["spec"].get("selector", {}).get("app.kubernetes.io/component") == "coordinator"
        )
        assert len(ready) == 1, [(p.name, p.ready) for p in coords]
        assert cluster.resolve(f"{svc}.default.svc") == [ready[0].ip]
        if case == "01-standby":
            assert len(coords) == 2, "the standby coordinator runs"
        if case == "08-tuned":
            assert all("startupProbe" in p.c for p in coords)
        if case == "09-custom-ports":
            values = yaml.safe_load((CI / f"{case}-values.yaml").read_text())
            for p in fleet.workers + coords:
                role = p.labels["app.kubernetes.io/component"]
                want = {k: values[role]["ports"][k] for k in ("rpc", "http")}
                assert {k: v[1] for k, v in p.ports().items()} == want, (p.name, p.ports())
            # the workers' own word: they registered with the custom RPC port
            rpc = values["worker"]["ports"]["rpc"]
            ids = [w["id"] for w in fleet.status()["workers"]]
            assert ids and all(i.endswith(f":{rpc}") for i in ids), ids
        if case == "03-tls":
            _check_mutual_tls(fleet, OUT_DIR / f"ci-{case}")
        finish_producer(fleet.produce(rate=500, seconds=8, seed=int(n)))
        check_verify(fleet)


def _check_mutual_tls(fleet: Any, out: Path) -> None:
    """The leader's RPC port answers only a client with a certificate of the fleet's CA."""
    from engine.errors import RpcError
    from ops.config import load_settings
    from ops.services import rpc_client

    leader = next(p for p in fleet.coordinators if p.ready)
    address = f"{leader.ip}:{leader.ports()['rpc'][1]}"
    rpc = next(o for o in fleet.cluster.of_kind("Secret") if o["metadata"]["name"].endswith("-rpc"))
    secret = fleet.cluster.secret(rpc["metadata"]["name"], "default")["rpc-secret"]
    out.mkdir(parents=True, exist_ok=True)
    good = tlskit.write_files(out / "good", _LEAF, _CA.pem)
    other_ca = tlskit.make_ca("another-ca")
    bad = tlskit.write_files(out / "bad", tlskit.make_leaf(other_ca), other_ca.pem + _CA.pem)

    def call(files: tuple[str, str, str] | None) -> Any:
        tls = dict(zip(("tls_cert", "tls_key", "tls_ca"), files or ("", "", ""), strict=True))
        settings = load_settings(secret=secret, coordinator=address, **tls)
        client = rpc_client(settings, address)
        try:
            return client.call("status", timeout=5)
        finally:
            client.close()

    assert call(good)["role"] == "leader", "a member of the fleet's CA gets an answer"
    for files in (None, bad):
        with pytest.raises(RpcError):
            call(files)
