"""Health, metrics and status over HTTP, on every process.

* ``/metrics``: Prometheus exposition (prometheus-client's default registry);
* ``/livez``: 200 while the process runs its loops;
* ``/readyz``: 200 once the process can do its job (a worker registered with the
  leading coordinator; a coordinator serves RPC and holds the leader lease: a standby is
  alive but not ready), else 503;
* ``/api/status``: the coordinator's status as JSON (batches, workers, receivers);
* ``/api/state/{stream}``: a named stream's state as JSON, consistent as of a completed
  batch (``?key=K&key=K2`` looks keys up, ``?prefix=P&limit=N`` scans; see
  :mod:`ops.coordinator.queries`); errors are ``{"error": ...}`` with 404 (unknown stream),
  400 (not stateful, bad limit) or 503 (no batch yet, state being rebuilt, not leading);
* ``/``: the coordinator's live status page (``ops/static/status.html``; the page holds no
  data, it reads ``/api/status``).

Reads are open by default, as the Spark and Flink UIs are (the chart's NetworkPolicy
limits who reaches the port). With a *token* (``DSTREAM_HTTP_AUTH=true``: the shared
secret), ``/api/status`` and ``/api/state/...`` answer 401 unless the request carries
``Authorization: Bearer <token>``; the status page sends the token it finds in its URL fragment
(``/#token=...``, never sent to the server in the URL). ``/metrics``, ``/livez`` and
``/readyz`` stay open for Prometheus and the kubelet.

A small threaded ``http.server``: these endpoints are read a few times a second at most.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("dstream.http")
_STATIC = Path(__file__).resolve().parent / "static"


class HttpEndpoints:
    """Serves the endpoints above on ``host:port`` (port 0 picks a free one).

    Args:
        live: returns True while the process is healthy.
        ready: returns True once the process can serve.
        status: returns the status dict (coordinator only; None elsewhere).
        token: when set, ``/api/status`` and ``/api/state/...`` require it as a bearer token.
        query: answers ``/api/state/{stream}``: ``query(stream, keys, prefix, limit)`` returns
            the HTTP code and the JSON body (coordinator only).

    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        live: Callable[[], bool],
        ready: Callable[[], bool],
        status: Callable[[], dict[str, Any]] | None = None,
        token: str | None = None,
        query: Callable[[str, list[str], str, int | None], tuple[int, dict[str, Any]]]
        | None = None,
    ) -> None:
        endpoints = self
        self._token = f"Bearer {token}".encode() if token else None

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug(fmt, *args)

            def do_GET(self) -> None:
                path, _, qs = self.path.partition("?")
                try:
                    endpoints._route(self, path, qs)
                except BrokenPipeError:
                    pass
                except Exception as e:
                    log.warning("http %s failed: %s", path, e)
                    self.send_error(500, "internal error")

        self._live, self._ready, self._status = live, ready, status
        self._query = query
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HttpEndpoints:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _route(self, h: BaseHTTPRequestHandler, path: str, qs: str = "") -> None:
        if path == "/metrics":
            self._send(h, 200, generate_latest(), CONTENT_TYPE_LATEST)
        elif path == "/livez":
            ok = self._live()
            self._send(h, 200 if ok else 503, b"ok\n" if ok else b"not live\n")
        elif path == "/readyz":
            ok = self._ready()
            self._send(h, 200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        elif path == "/api/status" and self._status is not None:
            if not self._authorized(h):
                self._unauthorized(h)
                return
            body = json.dumps(self._status(), default=str).encode()
            self._send(h, 200, body, "application/json")
        elif path.startswith("/api/state/") and self._query is not None:
            if not self._authorized(h):
                self._unauthorized(h)
                return
            self._state(h, self._query, path, qs)
        elif path in ("/", "/index.html") and self._status is not None:
            page = _STATIC / "status.html"
            self._send(h, 200, page.read_bytes(), "text/html; charset=utf-8")
        else:
            self._send(h, 404, b"not found\n")

    @staticmethod
    def _state(
        h: BaseHTTPRequestHandler,
        query: Callable[[str, list[str], str, int | None], tuple[int, dict[str, Any]]],
        path: str,
        qs: str,
    ) -> None:
        from urllib.parse import parse_qs, unquote

        stream = unquote(path[len("/api/state/") :])
        args = parse_qs(qs, keep_blank_values=True)
        raw_limit = (args.get("limit") or [""])[-1]
        limit: int | None = None
        if raw_limit:
            try:
                limit = int(raw_limit)
            except ValueError:
                body = {"error": f"limit must be an integer, got {raw_limit!r}"}
                HttpEndpoints._send(h, 400, json.dumps(body).encode(), "application/json")
                return
        prefix = (args.get("prefix") or [""])[-1]
        code, answer = query(stream, list(args.get("key") or []), prefix, limit)
        HttpEndpoints._send(h, code, json.dumps(answer).encode(), "application/json")

    @staticmethod
    def _unauthorized(h: BaseHTTPRequestHandler) -> None:
        h.send_response(401)
        h.send_header("WWW-Authenticate", 'Bearer realm="dstream"')
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        if self._token is None:
            return True
        got = (h.headers.get("Authorization") or "").encode()
        return hmac.compare_digest(got, self._token)

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8"
    ) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Cache-Control", "no-store")
        h.end_headers()
        h.wfile.write(body)
