"""The HTTP read rule: status open by default; with a token, /api/status needs it.

Probes and /metrics stay open either way (the kubelet and Prometheus do not carry it).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from ops.http import HttpEndpoints

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(req, timeout=5) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[int]:
    http = HttpEndpoints(
        "127.0.0.1",
        0,
        live=lambda: True,
        ready=lambda: True,
        status=lambda: {"role": "leader", "batches": []},
        token=request.param,
    ).start()
    try:
        yield http.port
    finally:
        http.stop()


@pytest.mark.parametrize("served", [None], indirect=True)
def test_reads_are_open_by_default(served: int) -> None:
    code, body = _get(served, "/api/status")
    assert code == 200 and json.loads(body)["role"] == "leader"


@pytest.mark.parametrize("served", ["s3cret"], indirect=True)
def test_with_a_token_the_status_needs_it(served: int) -> None:
    assert _get(served, "/api/status")[0] == 401
    assert _get(served, "/api/status", "wrong")[0] == 401
    assert _get(served, "/api/status", "s3cret")[0] == 200
    # the page itself holds no data; probes and metrics stay open
    for path in ("/", "/metrics", "/livez", "/readyz"):
        assert _get(served, path)[0] == 200, path
