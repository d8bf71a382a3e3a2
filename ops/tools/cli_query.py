"""``dstream query``: read a named stream's state from a running app (tooling).

Asks the app's leading coordinator over RPC (as ``dstream status`` does); the coordinator
reads the state from the workers, or from the latest checkpoint while a lost partition is
rebuilt (:mod:`ops.coordinator.queries`). The answer is consistent as of the batch it
names.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from typing import Any

from engine.errors import DStreamError, RpcError
from ops.cli_roles import require_secret
from ops.rpc import RemoteError

#: A query may wait for a state being rebuilt (``ops.coordinator.queries.WAIT_S``, 10 s).
QUERY_TIMEOUT_S = 30.0


def register(sub: Any) -> None:
    """Add ``query``."""
    p = sub.add_parser(
        "query",
        help="read a named stream's state from a running app",
        description=(
            "Print the state of a stream the app named with .name(...) (running_reduce, "
            "update_state_by_key, track, reduce_by_key_and_window, window), consistent as "
            "of the last completed batch (or the latest checkpoint while a lost worker's "
            "state is rebuilt). With KEYs, those keys (a non-string key is given as its "
            'JSON: 42, ["a",1]); without, a scan of the keys starting with --prefix.'
        ),
    )
    p.add_argument("--app-id", required=True, help="the app to query")
    p.add_argument(
        "--coordinator",
        help=(
            "coordinator address(es) host:port[,host:port] (default: DSTREAM_COORDINATOR, "
            "else the app's leader as its lease in Redis names it)"
        ),
    )
    p.add_argument("--redis-url", help="Redis URL, to find the leader when no address is given")
    p.add_argument("stream", help="the stream's name")
    p.add_argument("keys", nargs="*", metavar="KEY", help="keys to look up")
    p.add_argument("--prefix", default="", help="scan the keys that start with this")
    p.add_argument("--limit", type=int, help="at most this many entries in a scan (default 100)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.set_defaults(func=cmd_query)


def _coordinator(args: argparse.Namespace) -> str:
    """The coordinator address(es): the flag, DSTREAM_COORDINATOR, else the app's lease."""
    if args.coordinator:
        return str(args.coordinator)
    if os.environ.get("DSTREAM_COORDINATOR"):
        return os.environ["DSTREAM_COORDINATOR"]
    from ops.services import redis_client, settings_from
    from state.metalog import RedisMetaLog

    settings = settings_from(app_id=args.app_id, redis_url=args.redis_url)
    lease = RedisMetaLog(redis_client(settings), args.app_id).leader()
    if lease is None:
        msg = (
            f"app {args.app_id} is not running: no coordinator holds its lease "
            "(or pass --coordinator host:port)"
        )
        raise DStreamError(msg)
    return lease.holder


def cmd_query(args: argparse.Namespace) -> int:
    """Ask the leader, print the answer (exit 1 with one line when it cannot answer)."""
    from ops.leader_client import LeaderClient
    from ops.protocol import Query
    from ops.services import settings_from

    settings = settings_from(coordinator=_coordinator(args))
    require_secret(settings)
    q = Query(args.app_id, args.stream, list(args.keys), args.prefix, args.limit)
    client = LeaderClient(settings)
    try:
        for attempt in range(2 * len(client.addresses)):
            try:
                answer = client.call("query", q.to_wire(), timeout=QUERY_TIMEOUT_S)
                break
            except RemoteError as e:
                raise DStreamError(e.message) from None
            except RpcError:  # not the leader, or gone: the client moved on
                if attempt == 2 * len(client.addresses) - 1:
                    raise
    finally:
        client.close()
    print(json.dumps(answer, indent=2) if args.json else format_answer(answer))
    return 0


def format_answer(a: dict[str, Any]) -> str:
    """A header line (stream, batch, time, source), then one entry per line."""
    when = dt.datetime.fromtimestamp(a["batch_time_ms"] / 1000, dt.UTC)
    source = "the workers" if a["source"] == "workers" else "the latest checkpoint"
    lines = [
        f"{a['stream']} ({a['kind']}) as of batch {a['batch']} "
        f"({when.isoformat(timespec='milliseconds').replace('+00:00', 'Z')}), "
        f"from {source}: {len(a['items'])} entries"
    ]
    for e in a["items"]:
        if a["kind"] == "window":
            lines.append(json.dumps(e))
        else:
            k, v = e
            lines.append(f"{k if isinstance(k, str) else json.dumps(k)}\t{json.dumps(v)}")
    if a.get("more"):
        lines.append("... more entries: raise --limit or narrow --prefix")
    if a.get("missing"):
        lines.append(f"no state for: {', '.join(a['missing'])}")
    return "\n".join(lines)
