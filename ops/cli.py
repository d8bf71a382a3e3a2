"""The ``dstream`` command line: the roles' commands, plus the tooling's where installed.

Every command answers a user mistake with one line on stderr, ``dstream: <what is wrong>``
(``dstream: <file>:<line>: <what is wrong>`` where a file is involved), and an exit code
that tells the two kinds apart:

* 2, a usage error: a bad flag or value, a bad setting, an app file that cannot be used
  (:class:`~engine.errors.ConfigError`, which :class:`ops.services.AppFileError` is),
  what will not fix itself by trying again;
* 1, a runtime failure: any other error (an unreachable service, a refused request), and
  a ``ConfigError`` that says a service did not answer (``unreachable`` true, as
  :class:`ops.topics.TopicError` sets it).

No traceback, unless ``--debug`` (anywhere on the command line) or a log level of
``debug`` (``--log-level debug``, ``DSTREAM_LOG_LEVEL=debug``) asks for it. A ``DSTREAM_*``
variable that nothing reads (a misspelled setting) is reported once at start, with the
closest known name.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn

from engine.errors import ConfigError, DStreamError

#: Exit codes of a usage error (bad flag, value, setting or app file) and a runtime failure.
USAGE_ERROR = 2
RUNTIME_ERROR = 1


class Parser(argparse.ArgumentParser):
    """An argument parser that states a usage error in one line and exits 2.

    Each (sub-)parser records itself as the ``_parser`` default, so the parsed arguments
    name the innermost command: an unknown flag after ``run`` is ``run``'s error, with
    ``run``'s help to look at, not the top-level usage.
    """

    def __init__(self, *args: Any, debug_help: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(_parser=self)
        # on every command, so it may come anywhere (main also takes it out beforehand)
        self.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help
        )

    def error(self, message: str) -> NoReturn:
        """Print ``dstream: <command>: <message> (see dstream <command> --help)``; exit 2."""
        command = self.prog.removeprefix("dstream").strip()
        where = f"{command}: " if command else ""
        self.exit(USAGE_ERROR, f"dstream: {where}{message} (see {self.prog} --help)\n")


def _tools() -> ModuleType | None:
    """:mod:`ops.tools`, or None in the image (it ships the runtime only)."""
    if importlib.util.find_spec("ops.tools") is None:
        return None
    import ops.tools

    return ops.tools


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: ``coordinator`` and ``worker``, then the tools' commands."""
    from ops import cli_roles

    parser = Parser(
        prog="dstream",
        description="Discretized Streams on Kafka and Redis",
        debug_help="show the traceback of an error (also: DSTREAM_LOG_LEVEL=debug); "
        "accepted anywhere on the command line",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_roles.register(sub)
    tools = _tools()
    if tools is not None:
        tools.register(sub)
    return parser


def _take_debug(argv: list[str]) -> bool:
    """Remove every ``--debug`` before a ``--`` from *argv*; True if there was one."""
    end = argv.index("--") if "--" in argv else len(argv)
    found = "--debug" in argv[:end]
    argv[:end] = [a for a in argv[:end] if a != "--debug"]
    return found


def _say(message: object) -> None:
    """Print *message* to stderr, each of its lines as ``dstream: <line>``."""
    for line in str(message).splitlines() or [""]:
        print(f"dstream: {line}", file=sys.stderr)


def warn_unknown_env() -> None:
    """Report each ``DSTREAM_*`` variable that nothing reads, once, then drop it.

    Dropped from this process's environment so that the processes it starts (``dstream
    run``'s coordinator and workers) do not report it again; nothing reads it anyway.
    """
    from ops.config import unknown_env

    for name, close in unknown_env(os.environ):
        hint = f"did you mean {close}?" if close else "ignored"
        print(f"dstream: unknown setting {name} ({hint})", file=sys.stderr)
        os.environ.pop(name, None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dstream`` console script; returns the exit code.

    A :class:`ConfigError` (a usage error) prints one line per problem and exits 2, any
    other error one line and exits 1; a bad flag exits 2 from the parser
    (:class:`Parser`). Ctrl-C exits 130 without a traceback.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = _take_debug(args_list)
    warn_unknown_env()
    try:
        from ops.cli_roles import log_level

        parser = build_parser()
        args, extras = parser.parse_known_args(args_list)
        if extras:  # the innermost command's error, not the top-level usage
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extras)}")
        args.debug = debug = debug or log_level(args) == "debug"
        tools = _tools()
        if tools is not None:
            tools.prepare(args.command)
        code = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, ConfigError):
            _say(e)
            return RUNTIME_ERROR if getattr(e, "unreachable", False) else USAGE_ERROR
        text = str(e) if isinstance(e, DStreamError) else f"{type(e).__name__}: {e}"
        hint = "" if debug or isinstance(e, DStreamError) else " (--debug shows the traceback)"
        _say("; ".join(s.strip() for s in text.splitlines() if s.strip()) + hint)  # one line
        return RUNTIME_ERROR
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
