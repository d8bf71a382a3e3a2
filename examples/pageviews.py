"""The page-view pipeline: running view counts per url, written to Kafka each batch.

Input: JSON page views ``{"url", "user", "ts"}`` on topic ``pageviews`` (``dstream produce``
writes them). Output: topic ``pageview-counts``, key = JSON url, value = JSON running count,
one message per url whose count changed in the batch.

Run it: ``dstream run examples/pageviews.py --workers 2``. Topics can be renamed with
``PAGEVIEWS_TOPIC`` and ``PAGEVIEWS_OUTPUT``. The running counts are named ``counts``: read
them while the app runs with ``dstream query --app-id pageviews counts /page/1 /page/2`` (or
``--prefix /page/1``), or ``GET /api/state/counts?key=/page/1`` on the coordinator's HTTP
port. Unchanged, it also runs bounded: ``dstream run examples/pageviews.py --workers 2
--until end`` counts what the topic holds when it starts, then exits 0.
"""

import operator
import os

from engine import StreamingContext


def build(ssc: StreamingContext) -> None:
    views = ssc.kafka_stream(os.environ.get("PAGEVIEWS_TOPIC", "pageviews"), value_format="json")
    ones = views.map(lambda event: (event["url"], 1))
    counts = ones.reduce_by_key(operator.add).running_reduce(operator.add).name("counts")
    counts.to_kafka(os.environ.get("PAGEVIEWS_OUTPUT", "pageview-counts"))
