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
from collections.abc import Callable
from typing import Any

from engine.errors import ConfigError, DStreamError

log = logging.getLogger("dstream.run")


#: The ``--log-level`` choices (and ``DSTREAM_LOG_LEVEL``'s), case-insensitive.
LOG_LEVELS = ("debug", "info", "warning", "error")


def duration_arg(flag: str, *, positive: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for a duration flag, in seconds.

    Reads ``"500ms"``, ``"1s"``, ``"2m"``, ``"1h"`` or a number of seconds
    (:func:`engine.durations.to_seconds`); at least 0, or above 0 when *positive*.
    """
    from engine.durations import DurationError, to_seconds
    from ops.config import DURATION_TEXT_FORMS

    def parse(text: str) -> float:
        try:
            value = to_seconds(text, flag)
        except DurationError:
            msg = f"cannot read {text!r} as a duration; use {DURATION_TEXT_FORMS}"
            raise argparse.ArgumentTypeError(msg) from None
        if value < 0 or (positive and value == 0):
            msg = f"must be {'positive' if positive else 'at least 0'}, got {text}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def add_settings_args(p: argparse.ArgumentParser) -> None:
    """The flags of the settings every role shares (each overrides its ``DSTREAM_*``)."""
    p.add_argument("--app-id", help="app identity: prefixes Redis keys and transactional ids")
    p.add_argument(
        "--batch-interval",
        help='time per batch: "500ms", "1s", "2m" or seconds (default 1s)',
    )
    p.add_argument("--num-partitions", type=int, help="partitions of keyed operators")
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers")
    p.add_argument("--redis-url", help="Redis URL (redis:// or rediss://)")
    p.add_argument("--checkpoint-every", type=int, help="batches between state checkpoints")
    p.add_argument("--tls-cert", help="RPC TLS certificate (PEM); with --tls-key and --tls-ca")
    p.add_argument("--tls-key", help="RPC TLS private key (PEM)")
    p.add_argument("--tls-ca", help="CA bundle that RPC peers' certificates must chain to")


def add_common_args(p: argparse.ArgumentParser, app_positional: bool = False) -> None:
    """``--app`` (required; with *app_positional* also ``APP``), the settings, the log level."""
    if app_positional:
        p.add_argument(
            "app_file", nargs="?", metavar="APP", help="the app file (or --app; defines build)"
        )
        p.add_argument("--app", help="the app file (defines build(ssc))")
    else:
        p.add_argument("--app", required=True, help="the app file (defines build(ssc))")
    add_settings_args(p)
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        help="debug, info, warning or error (default: DSTREAM_LOG_LEVEL, else info)",
    )


def add_until_arg(p: argparse.ArgumentParser) -> None:
    """``--until end|TIMESTAMP``: a bounded run (``run`` and ``coordinator``)."""
    p.add_argument(
        "--until",
        metavar="end|TIMESTAMP",
        help="a bounded run: process every Kafka source up to its end offsets at start "
        "('end') or up to an ISO 8601 timestamp (e.g. 2026-11-30T12:00:00Z), then exit 0",
    )


def until_of(args: argparse.Namespace) -> Any:
    """The parsed ``--until`` (an :class:`engine.bounds.Bound`), or None; a bad one fails now."""
    from engine.bounds import parse_stop
    from engine.errors import GraphError

    try:
        return parse_stop(getattr(args, "until", None), "--until")
    except GraphError as e:  # a usage error (exit 2), not an app's
        raise ConfigError(str(e)) from None


def app_of(args: argparse.Namespace) -> str:
    """The app file of a command that takes it as ``APP`` or ``--app``.

    A usage error (exit 2) if neither or two different ones are given.
    """
    given: set[str] = {a for a in (getattr(args, "app_file", None), args.app) if a}
    if len(given) != 1:
        problem = "two app files given" if given else "the app file is required"
        args._parser.error(f"{problem}: give it as APP or --app APP")
    return given.pop()


def log_level(args: argparse.Namespace) -> str:
    """The log level: ``--log-level``, else ``DSTREAM_LOG_LEVEL``, else ``info``.

    Raises:
        ConfigError: ``DSTREAM_LOG_LEVEL`` is not one of :data:`LOG_LEVELS`.

    """
    given = getattr(args, "log_level", None)
    if given:
        return str(given)
    env = os.environ.get("DSTREAM_LOG_LEVEL", "").strip()
    if not env:
        return "info"
    if env.lower() not in LOG_LEVELS:
        msg = f"log level (DSTREAM_LOG_LEVEL): must be one of {', '.join(LOG_LEVELS)}, got {env!r}"
        raise ConfigError(msg)
    return env.lower()


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
    add_until_arg(p)
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

    p = sub.add_parser(
        "settings",
        help="print the settings the flags and DSTREAM_* variables make (secrets hidden)",
        description=(
            "Validate the settings from the flags over the DSTREAM_* environment, as a "
            "coordinator or worker would at start, and print them as JSON with secrets "
            "hidden; durations are shown in seconds. Exit 2 on an invalid value."
        ),
    )
    add_settings_args(p)
    p.add_argument("--coordinator", help="coordinator address(es) host:port[,host:port]")
    p.set_defaults(func=cmd_settings)


def setup_logging(level: str) -> None:
    """Log to stderr at *level* (one of :data:`LOG_LEVELS`; see :func:`log_level`)."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
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

    setup_logging(log_level(args))
    settings = role_settings(args)
    require_secret(settings)
    log.info("settings: %s", settings.redacted())
    return run_coordinator(
        settings, args.app, app_id_for(args.app, settings), args.expect_workers, until_of(args)
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from ops.services import app_id_for
    from ops.worker import run_worker

    setup_logging(log_level(args))
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


def cmd_settings(args: argparse.Namespace) -> int:
    """``dstream settings``: print the validated settings, secrets redacted."""
    import json

    settings = role_settings(args, coordinator=args.coordinator)
    print(json.dumps(settings.redacted(), indent=2, sort_keys=True))
    return 0
