"""Redis behind Sentinel: the URL form, and a client whose writes wait for a replica.

Used by :func:`ops.services.redis_client` (the one factory of the fleet's Redis clients)
for ``redis+sentinel://`` and ``rediss+sentinel://`` URLs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import redis

from engine.errors import ConfigError
from ops.config import redact_url

__all__ = [
    "ROLE_REFRESH_S",
    "WRITE_COMMANDS",
    "ReplicatedRedis",
    "SentinelTarget",
    "parse_sentinel_url",
]

log = logging.getLogger("dstream.redis")

#: Commands after which :class:`ReplicatedRedis` waits for a replica: every write the
#: fleet's metadata log, checkpoint store and Redis sink issue (scripts run as EVALSHA).
WRITE_COMMANDS = frozenset(
    {"SET", "INCR", "HSET", "HDEL", "DEL", "UNLINK", "EVAL", "EVALSHA", "EXPIRE", "PEXPIRE"}
)
#: How often a client re-reads the master's replica count (``ROLE``): a replica that comes
#: back is waited for again within a second, and the check costs one command a second.
ROLE_REFRESH_S = 1.0


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed Sentinel URL: where the sentinels are and which master to ask them for."""

    sentinels: list[tuple[str, int]]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[[user]:password@]h1:p1,h2:p2/<master-name>[/<db>]``.

    ``rediss+sentinel://`` means TLS to the sentinels and the servers. Deterministic and
    offline (no connection is made).

    Raises:
        ConfigError: the scheme, a ``host:port``, the master name or the db is wrong; the
            message shows the URL with its password redacted.

    """

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"DSTREAM_REDIS_URL {redact_url(url)!r}: {why}; expected "
            "redis+sentinel://[:password@]host1:port1,host2:port2/<master-name>/<db>"
        )

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis+sentinel", "rediss+sentinel"):
        why = "not a Sentinel URL"
        raise bad(why)
    rest = rest.split("?", 1)[0]
    auth, at, hosts_path = rest.rpartition("@")
    if not at:
        auth = ""
    hosts, _, path = hosts_path.partition("/")
    user, colon, pw = auth.partition(":")
    if auth and not colon:  # a bare "secret@" is a password, as redis:// URLs read it
        user, pw = "", auth
    sentinels: list[tuple[str, int]] = []
    for hp in hosts.split(","):
        host, c, port = hp.strip().rpartition(":")
        if not c or not host or not port.isdigit():
            why = f"sentinel address {hp!r} is not host:port"
            raise bad(why)
        sentinels.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        why = "name the master (and optionally the db) in the path"
        raise bad(why)
    db = parts[1] if len(parts) == 2 else "0"
    if not db.isdigit():
        why = f"db {db!r} is not a number"
        raise bad(why)
    return SentinelTarget(
        sentinels=sentinels,
        master=unquote(parts[0]),
        db=int(db),
        username=unquote(user) or None,
        password=unquote(pw) or None,
        tls=scheme == "rediss+sentinel",
    )


if TYPE_CHECKING:
    _Redis = redis.Redis[Any]
else:
    _Redis = redis.Redis


class ReplicatedRedis(_Redis):
    """A Redis client whose writes wait for one replica while the master has one.

    After each write command (:data:`WRITE_COMMANDS`) it sends ``WAIT 1
    <wait_timeout_ms>`` on the same connection. WAIT covers that connection's writes and,
    the replication stream being ordered, every write any connection made before them:
    a checkpoint's chunks are on a replica once the pointer to them, written after, is.
    So what the metadata log acknowledged is on a replica before a failover can promote
    it. The master's replica count is read with ``ROLE`` at most every
    :data:`ROLE_REFRESH_S`: with no replica (the old master died and is not back yet) a
    write does not wait, as waiting cannot make it safer. A WAIT that times out is logged
    once (until one succeeds again), not raised: the write itself succeeded.

    ``wait_timeout_ms`` (set by :func:`ops.services.redis_client` from
    ``redis_wait_timeout``; 0: never wait) bounds how long a write can stall on a slow
    replica.
    """

    wait_timeout_ms = 1000
    _replicas = 0
    _role_at = -1e9
    _warned = False

    def _send_command_parse_response(
        self, conn: Any, command_name: Any, *args: Any, **options: Any
    ) -> Any:
        # the one place redis-py sends a command on the connection it borrowed: WAIT
        # must go on that same connection (the stubs do not declare this method)
        send = super()._send_command_parse_response  # type: ignore[misc]
        result = send(conn, command_name, *args, **options)
        if self.wait_timeout_ms > 0 and str(command_name).upper() in WRITE_COMMANDS:
            self._wait_replica(conn)
        return result

    def _wait_replica(self, conn: Any) -> None:
        now = time.monotonic()
        if now - self._role_at > ROLE_REFRESH_S:
            conn.send_command("ROLE")
            role = self.parse_response(conn, "ROLE")
            master = bool(role) and role[0] in (b"master", "master")
            self._replicas = len(role[2]) if master else 0
            self._role_at = now
        if not self._replicas:
            return
        conn.send_command("WAIT", 1, self.wait_timeout_ms)
        acked = int(self.parse_response(conn, "WAIT"))
        if acked >= 1:
            self._warned = False
        elif not self._warned:
            self._warned = True
            log.warning(
                "redis write not acknowledged by a replica within %d ms: a failover now "
                "could lose it",
                self.wait_timeout_ms,
            )
