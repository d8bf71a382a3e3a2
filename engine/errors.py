"""The one error root of dstream-fleet and its per-package subclasses."""

from __future__ import annotations


class DStreamError(Exception):
    """Root of every error dstream-fleet raises on purpose."""


class GraphError(DStreamError):
    """The DStream graph is invalid; raised when the graph is built, never mid-stream."""


class UserFunctionError(DStreamError):
    """A user function raised on a record (and the app is set to fail, not dead-letter)."""

    def __init__(self, operator: str, error: BaseException, record: object, coords: str) -> None:
        self.operator = operator
        self.error = error
        self.record = record
        self.coords = coords
        super().__init__(
            f"user function of {operator} raised {type(error).__name__}: {error} "
            f"on record {record!r} ({coords})"
        )


class DecodeError(DStreamError):
    """A record could not be decoded with the stream's value format."""


class ConfigError(DStreamError):
    """A setting is invalid; raised at start-up."""


class ServiceError(DStreamError):
    """A local dev service (Kafka, Redis) could not be installed, started or reached."""


class RpcError(DStreamError):
    """The RPC transport failed: bad peer, bad frame, closed connection or remote error."""


class AuthError(RpcError):
    """The peer failed shared-secret authentication."""


class FrameTooLarge(RpcError):
    """A frame exceeded the transport's size limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")


class StateError(DStreamError):
    """State or checkpoint storage failed or was fenced."""


class FencedError(StateError):
    """A write was rejected because a newer epoch owns the resource."""


class NotLeaderError(RpcError):
    """An RPC reached a coordinator that does not lead (a standby, or a deposed leader).

    Attributes:
        coordinator: the address of the coordinator that answered.
        leader: the address of the leader as the lease names it ("" when unknown).

    """

    def __init__(self, coordinator: str, leader: str = "") -> None:
        self.coordinator = coordinator
        self.leader = leader
        super().__init__(
            f"coordinator {coordinator} does not lead; the leader is {leader or 'unknown'}"
        )


class MetadataLostError(StateError):
    """The app's metadata in Redis is gone or belongs to another run of the app.

    Raised when a fence finds no epoch (a ``FLUSHALL``, a failover to an empty replica),
    when a coordinator finds commit markers in Kafka that its Redis metadata does not
    account for, and when a Kafka commit marker carries another incarnation id. Fatal: a
    coordinator exits on it (exit code 5) and nothing retries it, since going on would
    write wrong output. The message says how to proceed (restore Redis, or
    ``dstream reset --app-id``).
    """
