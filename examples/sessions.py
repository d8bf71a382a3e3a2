"""User sessions from page views with ``track``: open, update, close on exit or timeout.

Input: JSON page views ``{"url", "user", "ts", "seq"}`` on topic ``pageviews``. Per user,
``track`` keeps a session: ``init`` on the user's first view, ``update`` on every later view
(in batch order), deleted (``None``) when the user visits ``EXIT_URL`` (default ``/exit``),
and closed after 30 s without views: the last ``update`` gets ``TIMEOUT`` and its result,
marked ``"ended": "timeout"``, is the session's final message.

Output: topic ``sessions``; per batch, one message per user whose session changed:
key = JSON user, value = JSON ``{"views", "first_ts", "last_ts"}`` (``null`` when the user
exited). The state is order-independent within a batch (a count and min/max times), so
the result does not depend on how a batch's records are spread over Kafka partitions.

Run it::

    dstream dev up
    dstream produce --topic pageviews --partitions 3 --rate 1000 --duration 60 &
    dstream run examples/sessions.py --workers 2

Settings: ``PAGEVIEWS_TOPIC``, ``SESSIONS_OUTPUT``, ``EXIT_URL``, ``SESSION_TIMEOUT``
(a duration such as ``"30s"``, a multiple of the batch interval).
"""

import os
from typing import Any

from engine import TIMEOUT, StreamingContext

EXIT_URL = os.environ.get("EXIT_URL", "/exit")
SESSION_TIMEOUT = os.environ.get("SESSION_TIMEOUT", "30s")


def by_user(event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return event["user"], event


def start(user: str, view: dict[str, Any]) -> dict[str, Any] | None:
    """A user's first view opens a session (an exit as first view opens none)."""
    if view["url"] == EXIT_URL:
        return None
    return {"views": 1, "first_ts": view["ts"], "last_ts": view["ts"]}


def update(user: str, session: dict[str, Any], view: Any) -> dict[str, Any] | None:
    """One more view; ``None`` on the exit url; the final state on a timeout."""
    if view is TIMEOUT:
        return {**session, "ended": "timeout"}
    if view["url"] == EXIT_URL:
        return None
    return {
        "views": session["views"] + 1,
        "first_ts": min(session["first_ts"], view["ts"]),
        "last_ts": max(session["last_ts"], view["ts"]),
    }


def build(ssc: StreamingContext) -> None:
    views = ssc.kafka_stream(os.environ.get("PAGEVIEWS_TOPIC", "pageviews"), value_format="json")
    sessions = views.map(by_user).track(start, update, timeout=SESSION_TIMEOUT)
    sessions.to_kafka(os.environ.get("SESSIONS_OUTPUT", "sessions"))
