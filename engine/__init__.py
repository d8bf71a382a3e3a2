"""dstream-fleet's public API: Discretized Streams on Kafka and Redis."""

from engine.errors import DStreamError, GraphError, UserFunctionError
from engine.graph import TIMEOUT, DStream, StreamingContext

__all__ = [
    "TIMEOUT",
    "DStream",
    "DStreamError",
    "GraphError",
    "StreamingContext",
    "UserFunctionError",
]
