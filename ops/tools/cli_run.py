"""``dstream run`` (a local fleet) and ``dstream status``: tools run by hand."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

from engine.errors import ConfigError
from ops.cli_roles import (
    add_common_args,
    add_until_arg,
    app_of,
    log_level,
    require_secret,
    role_settings,
    setup_logging,
    until_of,
)

log = logging.getLogger("dstream.run")

#: Grace period for children to stop after SIGTERM before they are killed.
STOP_GRACE_S = 15.0
#: More than this many process restarts within the window is a crash loop: give up.
MAX_RESTARTS = 10
RESTART_WINDOW_S = 60.0


def register(sub: Any) -> None:
    """Add ``run`` and ``status``."""
    p = sub.add_parser(
        "run",
        help="run an app on a local fleet (coordinator + N workers)",
        usage="dstream run [APP | --app APP] [options]",
    )
    add_common_args(p, app_positional=True)
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    add_until_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="show batches, workers and receivers of a running app")
    p.add_argument("--coordinator", help="coordinator address host:port")
    p.add_argument("--json", action="store_true", help="print raw JSON")
    p.set_defaults(func=cmd_status)


def _die_with_parent() -> None:
    """Child processes get SIGTERM if `dstream run` dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


def cmd_run(args: argparse.Namespace) -> int:
    """Start a coordinator and N workers as child processes; Ctrl-C stops them all."""
    from ops.services import app_id_for, build_context
    from ops.tools.devservices import free_port

    args.app = app_of(args)
    level = log_level(args)
    setup_logging(level)
    if args.workers < 1:
        msg = f"--workers must be at least 1, got {args.workers}"
        raise ConfigError(msg)
    settings = role_settings(args)
    app_id = app_id_for(args.app, settings)
    ssc = build_context(args.app, settings)  # a broken app file fails here, once, clearly
    until = until_of(args)  # a bad --until fails here too
    # a bounded run ends when its coordinator exits 0 (after the summary line); its workers
    # exit 0 when told the run finished, which must not stop the fleet before that
    bounded = until is not None or any(n.args.get("stop_bound") for n in ssc.nodes)
    from ops.startup import app_dependencies, wait_for_dependencies

    # Kafka or Redis down: one line each here, not one per process of the fleet
    wait_for_dependencies(settings, app_dependencies(settings, ssc.nodes, app_id, coordinator=True))
    env = dict(os.environ)
    # fewer glibc malloc arenas: a worker's many threads otherwise each keep freed memory
    env.setdefault("MALLOC_ARENA_MAX", "2")
    env["DSTREAM_SECRET"] = env.get("DSTREAM_SECRET") or secrets.token_hex(32)
    env["DSTREAM_COORDINATOR"] = env.get("DSTREAM_COORDINATOR") or f"127.0.0.1:{free_port()}"
    env["DSTREAM_KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
    env["DSTREAM_REDIS_URL"] = settings.redis_url.get_secret_value()
    env["DSTREAM_APP_ID"] = app_id
    env["DSTREAM_BATCH_INTERVAL"] = str(settings.batch_interval)
    env["DSTREAM_NUM_PARTITIONS"] = str(settings.num_partitions)
    if args.checkpoint_every:
        env["DSTREAM_CHECKPOINT_EVERY"] = str(args.checkpoint_every)
    from ops.tls import from_settings

    from_settings(settings)  # partial or unloadable TLS settings fail here, once
    for name in ("tls_cert", "tls_key", "tls_ca"):  # flags reach the children too
        if getattr(settings, name):
            env[f"DSTREAM_{name.upper()}"] = os.path.abspath(getattr(settings, name))
    base = [sys.executable, "-m", "ops.cli"]
    common = [
        "--app",
        args.app,
        "--log-level",
        level,
        *(["--debug"] if getattr(args, "debug", False) else []),
    ]
    http_port = int(env.get("DSTREAM_HTTP_PORT") or 0) or free_port()
    coord_env = {**env, "DSTREAM_HTTP_PORT": str(http_port)}
    # workers share this host: each takes free ports (deployed, each has the fixed ones)
    worker_env = {**env, "DSTREAM_HTTP_PORT": "0", "DSTREAM_RPC_PORT": "0"}
    coord = [*base, "coordinator", *common, "--expect-workers", str(args.workers)]
    if args.until:
        coord += ["--until", args.until]
    worker = [*base, "worker", *common]
    roles = [("coordinator", coord, coord_env)] + [
        (f"worker-{i}", worker, worker_env) for i in range(args.workers)
    ]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    restarts: list[float] = []
    finished: set[str] = set()
    try:
        for name, cmd, role_env in roles:
            procs[name] = subprocess.Popen(cmd, env=role_env, preexec_fn=_die_with_parent)
        log.info(
            "fleet of app %s: coordinator %s and %d workers; status page http://127.0.0.1:%d/",
            app_id,
            env["DSTREAM_COORDINATOR"],
            args.workers,
            http_port,
        )
        while True:
            for name, cmd, role_env in roles:
                code = procs[name].poll()
                if code is None or (code == 0 and bounded and name in finished):
                    continue
                if code == 0 and bounded and name != "coordinator":
                    finished.add(name)  # told the bounded run finished: wait for the summary
                    continue
                if code == 0:  # asked to stop (SIGTERM/SIGINT): the fleet is stopping
                    log.info("%s stopped; stopping the fleet", name)
                    return 0
                if name == "coordinator" and code == 3:  # the app failed (fail_on_error)
                    log.error("the app failed; stopping the fleet")
                    return code
                if name == "coordinator" and code == 5:  # its Redis metadata was lost
                    log.error("the app's metadata was lost; stopping the fleet")
                    return code
                # a crashed process is replaced, as a Kubernetes controller would: the
                # fleet recovers its work; only a crash loop stops everything
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(restarts) > MAX_RESTARTS:
                    log.error("%s keeps exiting (code %d); stopping the fleet", name, code)
                    return code or 1
                log.warning(
                    "%s (pid %d) exited with %d; starting a new one", name, procs[name].pid, code
                )
                procs[name] = subprocess.Popen(cmd, env=role_env, preexec_fn=_die_with_parent)
            time.sleep(0.2)
    except KeyboardInterrupt:
        log.info("stopping the fleet")
        return 0
    finally:
        _stop_all(list(procs.values()))


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        for p in reversed(procs):  # workers first, then the coordinator
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def cmd_status(args: argparse.Namespace) -> int:
    """Print the leader's status; with several coordinator addresses, find the leader."""
    from engine.errors import RpcError
    from ops.leader_client import LeaderClient
    from ops.services import settings_from
    from ops.tools.status import format_status

    settings = settings_from(coordinator=args.coordinator)
    require_secret(settings)
    client = LeaderClient(settings)
    try:
        for attempt in range(2 * len(client.addresses)):
            try:
                st = client.call("status", timeout=10)
            except RpcError:
                if attempt == 2 * len(client.addresses) - 1:
                    raise
                continue
            if st.get("role") in (None, "leader"):
                break
            # a standby answers with the leader's address: ask the leader
            if st.get("leader") in client.addresses:
                client = _switch(client, settings, st["leader"])
    finally:
        client.close()
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def _switch(client: Any, settings: Any, leader: str) -> Any:
    from ops.leader_client import LeaderClient

    client.close()
    order = [leader] + [a for a in settings.coordinator_addresses if a != leader]
    return LeaderClient(settings.model_copy(update={"coordinator": ",".join(order)}))
