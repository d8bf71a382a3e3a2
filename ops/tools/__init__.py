"""Tooling that developers and users run by hand, apart from the fleet's runtime.

Local Kafka and Redis (:mod:`ops.tools.devservices`, ``devkit/``), the load harness
(:mod:`ops.tools.produce`), the output checker (:mod:`ops.tools.verify`), the demo, and the
``dstream`` commands ``run``, ``status``, ``query``, ``dev``, ``produce`` and ``verify``. The
runtime (the rest of :mod:`ops`) never imports this package, and the image does not install it: a
deployed pod's ``dstream`` has only ``coordinator`` and ``worker``.
"""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the tooling's ``dstream`` commands to the parser's sub-commands."""
    from ops.tools import cli_dev, cli_produce, cli_query, cli_run, cli_verify

    for module in (cli_run, cli_dev, cli_produce, cli_verify, cli_query):
        module.register(sub)


def prepare(command: str) -> None:
    """Before *command* runs: use the ``dstream dev up`` services where nothing is set.

    Not for ``dstream dev`` itself, which tells the services it manages from addresses the
    user set (external ones) by the environment.
    """
    if command == "dev":
        return
    from ops.tools.devservices import use_dev_services

    use_dev_services()
