"""The deployed roles' command line: ``dstream coordinator``, ``dstream worker``, ``reset``.

Runtime, not tooling: the image's entry point is ``dstream`` with these commands (plus
whatever :mod:`ops.tools` adds where it is installed); ``dstream reset`` is here because
an operator runs it from the image after a Redis data loss. Shared flag sets and the
settings they build are public here, for the tooling's ``dstream run`` and ``status``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from engine.errors import ConfigError, DStreamError

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

    p = sub.add_parser(
        "reset",
        help="forget an app: delete its Kafka commit markers and its Redis keys",
        description=(
            "Delete the app's output commit marker groups in Kafka and every Redis key of "
            "the app (dstream:<app-id>:*), so that its next start is a fresh one. Refused "
            "while a coordinator holds the app's lease, unless --force."
        ),
    )
    p.add_argument("--app-id", required=True, help="the app id to reset")
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers")
    p.add_argument("--redis-url", help="Redis URL (redis:// or rediss://)")
    p.add_argument(
        "--force", action="store_true", help="reset even while a coordinator holds the lease"
    )
    p.set_defaults(func=cmd_reset)


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


#: Keys deleted per Redis ``DEL`` by ``dstream reset``.
RESET_DELETE_BATCH = 500


def cmd_reset(args: argparse.Namespace) -> int:
    """``dstream reset --app-id ID``: delete the app's commit markers and Redis keys.

    Redis first, then Kafka: a reset interrupted in between leaves markers without
    metadata, which the next start refuses (run the reset again), never the reverse
    (metadata whose markers are gone would let batches be written twice).
    """
    from ops.markers import delete_marker_groups
    from ops.services import redis_client, settings_from
    from state.metalog import RedisMetaLog

    app_id = args.app_id
    if not app_id or any(c in app_id for c in "*?[]\\"):
        msg = f"invalid app id {app_id!r}"
        raise ConfigError(msg)
    settings = settings_from(
        app_id=app_id, kafka_bootstrap=args.kafka_bootstrap, redis_url=args.redis_url
    )
    client = redis_client(settings)
    lease = RedisMetaLog(client, app_id).leader()
    if lease is not None and not args.force:
        msg = (
            f"app {app_id} is running: coordinator {lease.holder} holds its lease (epoch "
            f"{lease.epoch}). Stop the app first (or pass --force if that coordinator is gone)"
        )
        raise DStreamError(msg)
    keys = list(client.scan_iter(match=f"dstream:{app_id}:*", count=1000))
    for i in range(0, len(keys), RESET_DELETE_BATCH):
        client.delete(*keys[i : i + RESET_DELETE_BATCH])
    groups = delete_marker_groups(settings, app_id)
    print(
        f"reset app {app_id}: deleted {len(keys)} Redis keys and {len(groups)} Kafka commit "
        f"marker groups{': ' + ', '.join(groups) if groups else ''}; its next start is fresh"
    )
    return 0
