"""``dstream produce``: the Kafka producer harness from the shell (:mod:`ops.tools.produce`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ops.cli_roles import duration_arg


def _number(kind: Callable[[str], Any], name: str, *, minimum: float, strict: bool) -> Any:
    """An argparse ``type`` that parses with *kind* and rejects values below *minimum*."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            msg = f"{name} must be a number, got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if value != value or value < minimum or (strict and value == minimum):  # NaN too
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            msg = f"{name} must be {bound}, got {text}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def register(sub: Any) -> None:
    """Add the ``produce`` sub-command to *sub* (an argparse sub-parsers action).

    The parser's ``func`` default runs the harness and returns the exit code: 0 if every
    record was delivered, 1 if any delivery failed.
    """
    p = sub.add_parser(
        "produce",
        help="produce page-view events to Kafka at a held rate (load harness)",
        description=(
            "Produce page-view events {url, user, ts, seq} keyed by url to a Kafka topic at a "
            "target rate. Bootstrap: --kafka-bootstrap, else DSTREAM_KAFKA_BOOTSTRAP, else the "
            "local dev services, else 127.0.0.1:19092; DSTREAM_KAFKA_CONFIG (JSON) passes "
            "librdkafka settings through."
        ),
    )
    p.add_argument("--topic", required=True, help="target topic")
    p.add_argument(
        "--rate",
        type=_number(float, "--rate", minimum=0, strict=False),
        default=1000.0,
        help="records per second; 0 means as fast as possible (default: 1000)",
    )
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument(
        "--count", type=_number(int, "--count", minimum=1, strict=False), help="records to send"
    )
    stop.add_argument(
        "--duration",
        type=duration_arg("--duration", positive=True),
        help='how long to run: "30s", "2m" or seconds',
    )
    p.add_argument(
        "--keys",
        type=_number(int, "--keys", minimum=1, strict=False),
        default=1000,
        help="distinct urls (default: 1000)",
    )
    p.add_argument("--key-dist", choices=("uniform", "zipf"), default="uniform")
    p.add_argument(
        "--zipf-s",
        type=_number(float, "--zipf-s", minimum=0, strict=True),
        default=1.1,
        help="Zipf skew exponent (default: 1.1)",
    )
    p.add_argument("--format", dest="fmt", choices=("json", "msgpack"), default="json")
    p.add_argument(
        "--partitions",
        type=_number(int, "--partitions", minimum=1, strict=False),
        help="create the topic with this many partitions if it is missing",
    )
    p.add_argument("--seed", type=int, default=0, help="event generator seed (default: 0)")
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers HOST:PORT")
    # the flag's former name, still accepted
    p.add_argument("--bootstrap", dest="kafka_bootstrap", help=argparse.SUPPRESS)
    p.add_argument(
        "--procs",
        type=_number(int, "--procs", minimum=1, strict=False),
        default=1,
        help=(
            "producer processes; each owns a disjoint set of urls (so per-url seq stays in "
            "order) and sends its share of the rate; one summary line for all (default: 1)"
        ),
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: on when stderr is a terminal)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Run the harness from parsed arguments; print the summary line; return the exit code."""
    from ops.tools.produce import (
        kafka_extra_config,
        produce_pageviews,
        resolve_bootstrap,
        validate_args,
    )

    validate_args(
        rate=args.rate,
        count=args.count,
        duration=args.duration,
        keys=args.keys,
        key_dist=args.key_dist,
        zipf_s=args.zipf_s,
        fmt=args.fmt,
        partitions=args.partitions,
        procs=args.procs,
    )
    progress = sys.stderr.isatty() if args.progress is None else bool(args.progress)
    result = produce_pageviews(
        resolve_bootstrap(args.kafka_bootstrap),
        args.topic,
        rate=args.rate,
        count=args.count,
        duration=args.duration,
        keys=args.keys,
        key_dist=args.key_dist,
        zipf_s=args.zipf_s,
        fmt=args.fmt,
        seed=args.seed,
        partitions=args.partitions,
        progress=progress,
        extra_config=kafka_extra_config(),
        procs=args.procs,
    )
    print(
        f"produced {result.records} records to {args.topic} in {result.seconds:.2f} s: "
        f"{result.rate:,.0f} records/s (target "
        f"{'max' if args.rate == 0 else f'{args.rate:,.0f}'}), {result.errors} errors"
    )
    if result.errors:
        print(f"dstream produce: first delivery error: {result.first_error}", file=sys.stderr)
        return 1
    return 0
