"""The deployed roles' command line: ``dstream coordinator`` and ``dstream worker``.

Runtime, not tooling: the image's entry point is ``dstream`` with these two commands
(plus whatever :mod:`ops.tools` adds where it is installed). Shared flag sets and the
settings they build are public here, for the tooling's ``dstream run`` and ``status``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from engine.errors import ConfigError

log = logging.getLogger("dstream.run")


def add_common_args(p: argparse.ArgumentParser, app_positional: bool = False) -> None:
    if app_positional:
        p.add_argument("app", help="the app file (defines build(ssc))")
    else:
        p.add_argument("--app", required=True, help="the app file (defines build(ssc))")
    p.add_argument("--app-id", help="app identity: prefixes Redis keys and transactional ids")
    p.add_argument("--batch-interval", type=float, help="seconds per batch (default 1.0)")
    p.add_argument("--num-partitions", type=int, help="partitions of keyed operators")
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers")
    p.add_argument("--redis-url", help="Redis URL (redis:// or rediss://)")
    p.add_argument("--checkpoint-every", type=int, help="batches between state checkpoints")
    p.add_argument("--log-level", default=os.environ.get("DSTREAM_LOG_LEVEL", "INFO"))
    p.add_argument("--tls-cert", help="RPC TLS certificate (PEM); with --tls-key and --tls-ca")
    p.add_argument("--tls-key", help="RPC TLS private key (PEM)")
    p.add_argument("--tls-ca", help="CA bundle that RPC peers' certificates must chain to")


def add_listen_args(p: argparse.ArgumentParser, role: str) -> None:
    """Flags for where a deployed role listens and how peers reach it."""
    p.add_argument("--bind-host", help="interface to listen on (the image binds 0.0.0.0)")
    p.add_argument(
        "--http-port", type=int, help=f"HTTP port: probes, /metrics (default: the {role}'s)"
    )
    if role == "worker":
        p.add_argument("--rpc-port", type=int, help="RPC port (default 7071; 0: any free port)")
        p.add_argument("--advertise-host", help="host name or address peers reach this worker at")


def register(sub: Any) -> None:
    """Add the ``coordinator`` and ``worker`` commands."""
    p = sub.add_parser("coordinator", help="run the coordinator")
    add_common_args(p)
    p.add_argument(
        "--expect-workers", type=int, default=1, help="workers to wait for before the first batch"
    )
    add_listen_args(p, "coordinator")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("worker", help="run a worker")
    add_common_args(p)
    p.add_argument("--coordinator", help="coordinator address host:port")
    add_listen_args(p, "worker")
    p.set_defaults(func=cmd_worker)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def role_settings(args: argparse.Namespace, **more: Any) -> Any:
    from ops.services import settings_from

    return settings_from(
        app_id=args.app_id,
        batch_interval=args.batch_interval,
        num_partitions=args.num_partitions,
        kafka_bootstrap=args.kafka_bootstrap,
        redis_url=args.redis_url,
        checkpoint_every=args.checkpoint_every,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        **{k: getattr(args, k, None) for k in _LISTEN_FLAGS},
        **more,
    )


#: Settings that the listen flags of :func:`add_listen_args` override.
_LISTEN_FLAGS = ("bind_host", "http_port", "rpc_port", "advertise_host")


def require_secret(settings: Any) -> None:
    if not settings.secret.get_secret_value():
        msg = (
            "DSTREAM_SECRET is not set: the RPC transport needs a shared secret "
            "(dstream run generates one for its local fleet)"
        )
        raise ConfigError(msg)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from ops.coordinator import run_coordinator
    from ops.services import app_id_for

    setup_logging(args.log_level)
    settings = role_settings(args)
    require_secret(settings)
    log.info("settings: %s", settings.redacted())
    return run_coordinator(settings, args.app, app_id_for(args.app, settings), args.expect_workers)


def cmd_worker(args: argparse.Namespace) -> int:
    from ops.services import app_id_for
    from ops.worker import run_worker

    setup_logging(args.log_level)
    settings = role_settings(args, coordinator=args.coordinator)
    require_secret(settings)
    code = run_worker(settings, args.app, app_id_for(args.app, settings))
    # exit now: a task thread abandoned at the stop deadline would otherwise hold the
    # interpreter's exit (concurrent.futures joins its threads at exit, without a timeout)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
