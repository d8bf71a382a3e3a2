"""``dstream verify``: check committed output against a reference (see :mod:`ops.tools.verify`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ops.cli_roles import duration_arg

#: Pause between attempts with ``--wait``: a batch interval or two of a typical app.
RETRY_PAUSE_S = 2.0


def register(sub: Any) -> None:
    """Add the ``verify`` sub-command; its ``func`` returns 0 (no difference) or 1."""
    p = sub.add_parser(
        "verify",
        help="compare an output topic (read_committed) with a reference over the input topic",
        description=(
            "Read the output topic with read_committed, compute the reference from every "
            "record of the input topic with the app's own graph, and print every difference "
            "(missing key, extra key, wrong value, duplicate in a batch). Exit 1 when there "
            "is any. Supports running_reduce changelogs (last value per key) and per-record "
            "outputs (map/filter/flat_map)."
        ),
    )
    p.add_argument("--app", required=True, help="the app file that wrote the output")
    p.add_argument(
        "--app-id", help="the app's id (default: DSTREAM_APP_ID, else the app file's name)"
    )
    p.add_argument("--input", help="input topic (default: the app's kafka_stream topic)")
    p.add_argument("--output", help="output topic (default: the app's to_kafka topic)")
    p.add_argument("--kafka-bootstrap", help="Kafka bootstrap servers")
    p.add_argument(
        "--dead-letters",
        help="dead-letter topic to count and check (default: DSTREAM_DEAD_LETTER_TOPIC, "
        "else {app id}-dead-letters; the app id is DSTREAM_APP_ID or the app file's name)",
    )
    p.add_argument(
        "--wait",
        type=duration_arg("--wait"),
        default=0.0,
        help='retry for up to this long ("30s", "2m" or seconds) while there are '
        "differences (lets a running fleet catch up; default 0)",
    )
    p.add_argument(
        "--max-print",
        type=int,
        default=0,
        help="print at most this many differences (default 0: all of them)",
    )
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from ops.services import build_context, settings_from
    from ops.tools.verify import verify

    settings = settings_from(kafka_bootstrap=args.kafka_bootstrap, app_id=args.app_id)
    ssc = build_context(args.app, settings)
    conf = settings.kafka_client_config()
    app_id = settings.app_id or Path(args.app).stem
    dlq = args.dead_letters or settings.dead_letter_topic or f"{app_id}-dead-letters"
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        result = verify(
            ssc,
            conf,
            input_topic=args.input,
            output_topic=args.output,
            dead_letter_topic=dlq,
        )
        if result.ok or time.monotonic() + RETRY_PAUSE_S > deadline:
            break
        time.sleep(RETRY_PAUSE_S)
    shown = result.differences[: args.max_print] if args.max_print > 0 else result.differences
    for d in shown:
        print(d)
    if len(shown) < len(result.differences):
        print(f"... and {len(result.differences) - len(shown)} more")
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1
