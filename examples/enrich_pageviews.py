"""Page views enriched from two tables: a page table from a file, a user table from Kafka.

Input: JSON page views ``{"url", "user", "ts", "seq"}`` on topic ``pageviews`` (``dstream
produce`` writes them). Tables:

* pages: ``examples/data/pages.jsonl`` (``PAGES_FILE``), JSON lines
  ``{"key": "/page/0", "value": {"section": "news"}}``, loaded once;
* users: the compacted topic ``users`` (``USERS_TOPIC``), key = user id, value = JSON
  ``{"country": ...}``; a later record replaces a user, a null value deletes them. Updates
  apply from the batch they arrive in.

Output: topic ``pageviews-enriched`` (``ENRICHED_OUTPUT``); per view, key = JSON user,
value = JSON ``{"url", "seq", "section", "country"}`` (``"unknown"`` for a page or a user
the tables do not hold).

Run it::

    dstream dev up
    python examples/enrich_pageviews.py            # writes 10,000 users to topic users
    dstream produce --topic pageviews --partitions 3 --rate 1000 --duration 60 &
    dstream run examples/enrich_pageviews.py --workers 2
"""

import os
import sys
from pathlib import Path
from typing import Any

from engine import StreamingContext

PAGES_FILE = os.environ.get("PAGES_FILE", str(Path(__file__).parent / "data" / "pages.jsonl"))
COUNTRIES = ("de", "fr", "jp", "br", "us")


def by_url(view: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return view["url"], view


def add_section(kv: tuple[str, tuple[dict[str, Any], Any]]) -> tuple[str, dict[str, Any]]:
    _url, (view, page) = kv
    return view["user"], {
        "url": view["url"],
        "seq": view["seq"],
        "section": page["section"] if page else "unknown",
    }


def add_country(kv: tuple[str, tuple[dict[str, Any], Any]]) -> tuple[str, dict[str, Any]]:
    user, (view, profile) = kv
    return user, {**view, "country": profile["country"] if profile else "unknown"}


def build(ssc: StreamingContext) -> None:
    views = ssc.kafka_stream(os.environ.get("PAGEVIEWS_TOPIC", "pageviews"), value_format="json")
    pages = ssc.table(path=PAGES_FILE)
    users = ssc.table(os.environ.get("USERS_TOPIC", "users"))
    enriched = (
        views.map(by_url)
        .left_outer_join(pages)
        .map(add_section)
        .left_outer_join(users)
        .map(add_country)
    )
    enriched.to_kafka(os.environ.get("ENRICHED_OUTPUT", "pageviews-enriched"))


def write_users(bootstrap: str, topic: str, count: int = 10_000) -> None:
    """Write *count* users ``u0`` ... (the ids ``dstream produce`` uses) to a compacted topic."""
    import json

    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic not in admin.list_topics(timeout=10).topics:
        new = NewTopic(topic, num_partitions=1, config={"cleanup.policy": "compact"})
        admin.create_topics([new])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(count):
        value = json.dumps({"country": COUNTRIES[i % len(COUNTRIES)]}).encode()
        producer.produce(topic, key=f"u{i}".encode(), value=value)
        producer.poll(0)
    producer.flush(30)


if __name__ == "__main__":
    from ops.tools.produce import resolve_bootstrap

    write_users(
        resolve_bootstrap(),
        os.environ.get("USERS_TOPIC", "users"),
        int(sys.argv[1]) if len(sys.argv) > 1 else 10_000,
    )
