"""dstream-fleet's public API: Discretized Streams on Kafka and Redis."""

from engine._graph import TIMEOUT, DStream, StreamingContext
from engine.errors import DStreamError, GraphError, UserFunctionError

__all__ = [
    "TIMEOUT",
    "DStream",
    "DStreamError",
    "GraphError",
    "StreamingContext",
    "UserFunctionError",
]
