"""A fleet with mutual TLS on every RPC connection, and a certificate rotation mid-stream.

Both run the fault app (running counts to Kafka and Redis) on `dstream run` with
``DSTREAM_TLS_*`` set, and check the committed output exactly against the input (see
``tests/fault/scenario.py``). The certificates live in a directory laid out like a mounted
Kubernetes Secret and are rotated the way a Secret update does it (symlink swap).
"""

from __future__ import annotations

import os
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.errors import AuthError
from ops.config import Settings
from ops.rpc import RpcClient
from ops.services import rpc_client
from ops.tls import DEFAULT_CHECK_EVERY_S
from ops.tools.devservices import free_port
from tests.fault.scenario import run_scenario, status
from tests.fleetkit import Fleet, role_pids, wait_for
from tests.tlskit import Ca, Leaf, SecretDir, make_ca, make_leaf, server_cert, write_files

SECRET = "fleet-tls-test-secret"
#: one rotation check period plus a margin: after this, every new connection of every
#: process of the fleet uses the files as they are now
SETTLE_S = DEFAULT_CHECK_EVERY_S + 1.5


def _client_settings(tmp: Path, leaf: Leaf | None, ca_pem: bytes, name: str) -> Settings:
    cert, key, ca = write_files(tmp / name, leaf, ca_pem)
    return Settings(secret=SECRET, tls_cert=cert, tls_key=key, tls_ca=ca)


def _addr(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _worker_addresses(port: int) -> list[str]:
    return [w["id"] for w in status(port)["workers"]]


def _serves(address: str, ca: Ca, leaf: Leaf) -> bool:
    """Whether the RPC server at *address* presents *leaf* to a new connection now."""
    try:
        return server_cert(_addr(address), ca.pem, make_leaf(ca, "probe")) == leaf.der
    except (OSError, ssl.SSLError):
        return False


def _refused(settings: Settings, address: str) -> bool:
    try:
        with rpc_client(settings, address) as c:
            c.call("status", timeout=10)
    except AuthError:
        return True
    return False


def _scenario(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Callable[..., str], tmp: Path
) -> Callable[..., dict[str, Any]]:
    def run(*, fault: Callable[[Fleet, int], None], env: dict[str, str], **kw: Any) -> Any:
        return run_scenario(
            kafka=kafka_bootstrap,
            redis_url=redis_url,
            app_id=app_id,
            new_topic=new_topic,
            tmp=tmp,
            fault=fault,
            env={"DSTREAM_SECRET": SECRET, **env},
            **kw,
        )

    return run


def test_fleet_with_mutual_tls_is_exact(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    ca, other_ca = make_ca("fleet-ca"), make_ca("other-ca")
    fleet_leaf = make_leaf(ca, "dstream")
    secret_dir = SecretDir(tmp_path / "tls", fleet_leaf, ca.pem)
    coordinator = f"127.0.0.1:{free_port()}"
    checked: dict[str, Any] = {}

    def probe(fleet: Fleet, port: int) -> None:
        """Mid-stream: every RPC server speaks mTLS only, with the fleet's certificate."""
        workers = _worker_addresses(port)
        assert len(workers) == 3
        for address in [coordinator, *workers]:
            assert _serves(address, ca, fleet_leaf), address
        # a plain TCP client with the right secret gets no answer
        with (
            RpcClient(_addr(coordinator), secret=SECRET.encode(), handshake_timeout=1) as plain,
            pytest.raises(AuthError, match="did not greet"),
        ):
            plain.call("status")
        # a client with a certificate from another CA is refused (coordinator and a worker)
        intruder = _client_settings(tmp_path, make_leaf(other_ca), ca.pem + other_ca.pem, "x")
        assert _refused(intruder, coordinator)
        assert _refused(intruder, workers[0])
        # a client without a certificate is refused
        anonymous = ssl.create_default_context(cafile=secret_dir.ca)
        anonymous.check_hostname = False
        with (
            RpcClient(_addr(coordinator), secret=SECRET.encode(), ssl_context=anonymous) as c,
            pytest.raises(AuthError, match="TLS"),
        ):
            c.call("status")
        # a member with the fleet's CA and the secret gets answers
        member = _client_settings(tmp_path, make_leaf(ca, "cli"), ca.pem, "member")
        with rpc_client(member, coordinator) as c:
            checked["status"] = c.call("status", timeout=10)

    res = _scenario(kafka_bootstrap, redis_url, app_id, new_topic, tmp_path)(
        fault=probe, env={**secret_dir.env(), "DSTREAM_COORDINATOR": coordinator}
    )
    assert checked["status"]["app"] == app_id
    log = res["log"]
    assert log.count("RPC mutual TLS on") >= 4, log[-3000:]  # coordinator + 3 workers
    refusals = [line for line in log.splitlines() if "TLS handshake failed" in line]
    assert refusals, log[-3000:]


def test_certificate_rotation_mid_stream_keeps_output_exact(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    """A full CA rotation as an operator does it, while the stream runs; then a worker dies.

    1. the CA bundle gains the new CA; 2. every process gets a certificate of the new CA;
    3. the old CA leaves the bundle. After 3, only new-CA certificates work, so the worker
    started to replace a killed one (and every connection it makes or takes) proves that
    the rotated files are in use by the coordinator and the surviving workers too.
    """
    old_ca, new_ca = make_ca("fleet-ca-2025"), make_ca("fleet-ca-2026")
    old_leaf, new_leaf = make_leaf(old_ca, "dstream"), make_leaf(new_ca, "dstream")
    secret_dir = SecretDir(tmp_path / "tls", old_leaf, old_ca.pem)
    coordinator = f"127.0.0.1:{free_port()}"
    seen: dict[str, Any] = {}

    def rotate(fleet: Fleet, port: int) -> None:
        before = _worker_addresses(port)
        assert len(before) == 3
        for address in [coordinator, *before]:
            assert _serves(address, old_ca, old_leaf), address
        secret_dir.update(old_leaf, old_ca.pem + new_ca.pem)  # 1. trust both
        time.sleep(SETTLE_S)
        secret_dir.update(new_leaf, old_ca.pem + new_ca.pem)  # 2. new certificates
        time.sleep(SETTLE_S)
        # new connections get the new certificate, from every server of the fleet
        for address in [coordinator, *before]:
            wait_for(lambda a=address: _serves(a, new_ca, new_leaf), 30, f"{address} rotated")
        secret_dir.update(new_leaf, new_ca.pem)  # 3. the old CA is no longer trusted
        time.sleep(SETTLE_S)
        old_member = _client_settings(tmp_path, make_leaf(old_ca), old_ca.pem, "old")
        wait_for(lambda: _refused(old_member, coordinator), 30, "the old CA refused")
        new_member = _client_settings(tmp_path, make_leaf(new_ca), new_ca.pem, "new")
        with rpc_client(new_member, coordinator) as c:
            assert c.call("status", timeout=10)["app"] == app_id
        # a worker dies; its replacement must connect to all, and all to it, on new certs
        victim = role_pids(fleet, "worker")[0]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = _worker_addresses(port)
            return len(now) == 3 and now != before

        wait_for(replaced, 60, "the replacement worker to join")
        seen["after"] = _worker_addresses(port)

    res = _scenario(kafka_bootstrap, redis_url, app_id, new_topic, tmp_path)(
        fault=rotate,
        env={**secret_dir.env(), "DSTREAM_COORDINATOR": coordinator},
        rate=800,
        seconds=45.0,
    )
    log = res["log"]
    assert "starting a new one" in log
    assert log.count("RPC TLS files changed") >= 3, log[-3000:]
    # the replacement and the survivors are alive at the end: their heartbeats (RPC calls
    # to the coordinator) keep flowing over connections made with the new certificates
    joined = [w for w in res["status"]["workers"] if w["id"] in set(seen["after"])]
    assert len(joined) == 3
    assert all(w["last_seen_s"] < 5 for w in joined), joined
