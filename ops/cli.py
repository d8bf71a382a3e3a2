"""The ``dstream`` command line: the roles' commands, plus the tooling's where installed."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

from engine.errors import DStreamError


def _tools() -> ModuleType | None:
    """:mod:`ops.tools`, or None in the image (it ships the runtime only)."""
    if importlib.util.find_spec("ops.tools") is None:
        return None
    import ops.tools

    return ops.tools


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: ``coordinator`` and ``worker``, then the tools' commands."""
    from ops import cli_roles

    parser = argparse.ArgumentParser(
        prog="dstream", description="Discretized Streams on Kafka and Redis"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_roles.register(sub)
    tools = _tools()
    if tools is not None:
        tools.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dstream`` console script; returns the exit code.

    A :class:`DStreamError` prints one line (``dstream: <message>``) and exits 1; Ctrl-C
    exits 130 without a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    tools = _tools()
    if tools is not None:
        tools.prepare(args.command)
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
