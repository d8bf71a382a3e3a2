"""``dstream dev up|down|status|env|ensure``: the local Kafka and Redis of a developer.

All state lives in the dev home (``DSTREAM_DEV_HOME``, default
``${XDG_CACHE_HOME:-~/.cache}/dstream-fleet/dev``); see :mod:`ops.tools.devservices`.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any

from engine.errors import ServiceError
from ops.cli_roles import duration_arg
from ops.tools import devservices as ds


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else ds.dev_home()


def _cmd_up(args: argparse.Namespace) -> int:
    lines = ds.up(
        _home(args),
        kafka_port=args.kafka_port,
        controller_port=args.controller_port,
        redis_port=args.redis_port,
        kafka_timeout=args.timeout,
    )
    for s in lines:
        print(s.line())
    print(f'# eval "$(dstream dev env)" to export the addresses (dev home {_home(args)})')
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    stopped = ds.down(_home(args))
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    for s in ds.status(_home(args)):
        print(s.line())
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    found = ds.discovered_env(_home(args))
    kafka = os.environ.get("DSTREAM_KAFKA_BOOTSTRAP") or found.get("kafka_bootstrap")
    redis = os.environ.get("DSTREAM_REDIS_URL") or found.get("redis_url")
    if not kafka and not redis:
        msg = "no dev services are running: start them with `dstream dev up`"
        raise ServiceError(msg)
    if kafka:
        print(f"export DSTREAM_KAFKA_BOOTSTRAP={shlex.quote(kafka)}")
    if redis:
        print(f"export DSTREAM_REDIS_URL={shlex.quote(redis)}")
    return 0


def _cmd_ensure(args: argparse.Namespace) -> int:
    _ = args
    ds.find_executable(
        "java", "install a Java 17+ runtime (apt-get install -y openjdk-17-jre-headless)"
    )
    print(f"kafka jars: {ds.ensure_kafka_libs(quiet=False)}")
    print(f"redis-server: {ds.ensure_redis_server()}")
    return 0


def register(sub: Any) -> None:
    """Add ``dev`` and its sub-commands to *sub* (an argparse sub-parsers action)."""
    dev = sub.add_parser(
        "dev",
        help="local Kafka (KRaft) and Redis for development",
        description="Start, stop and inspect the local dev Kafka and Redis.",
    )
    dev.add_argument(
        "--home", default="", help="state folder (default: $DSTREAM_DEV_HOME or the cache)"
    )
    dsub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")

    p = dsub.add_parser("up", help="start Kafka and Redis (idempotent)")
    p.add_argument("--kafka-port", type=int, default=ds.DEFAULT_KAFKA_PORT)
    p.add_argument("--controller-port", type=int, default=ds.DEFAULT_CONTROLLER_PORT)
    p.add_argument("--redis-port", type=int, default=ds.DEFAULT_REDIS_PORT)
    p.add_argument(
        "--timeout",
        type=duration_arg("--timeout", positive=True),
        default=ds.KAFKA_START_TIMEOUT_S,
        help='how long to wait for the broker ("90s", "2m" or seconds; default: %(default)s s)',
    )
    p.set_defaults(func=_cmd_up)

    p = dsub.add_parser("down", help="stop what `dev up` started and wipe its data")
    p.set_defaults(func=_cmd_down)
    p = dsub.add_parser("status", help="tell what runs")
    p.set_defaults(func=_cmd_status)
    p = dsub.add_parser("env", help="print `export DSTREAM_...` lines for the running services")
    p.set_defaults(func=_cmd_env)
    p = dsub.add_parser("ensure", help="resolve the Kafka jars and redis-server, start nothing")
    p.set_defaults(func=_cmd_ensure)
