"""The ``dstream`` command line: one sub-command module per role, registered here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.errors import DStreamError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; each sub-command module adds its own parsers."""
    from ops import _cli_dev, _cli_produce, _cli_run, _cli_verify

    parser = argparse.ArgumentParser(
        prog="dstream", description="Discretized Streams on Kafka and Redis"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (_cli_run, _cli_dev, _cli_produce, _cli_verify):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dstream`` console script; returns the exit code.

    A :class:`DStreamError` prints one line (``dstream: <message>``) and exits 1; Ctrl-C
    exits 130 without a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except DStreamError as e:
        print(f"dstream: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
