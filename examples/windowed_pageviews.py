"""Page views with a running count per url and a 10 s window of counts sliding every 1 s.

The benchmark app of ``bench/throughput.py``: the same input as ``examples/pageviews.py``
(JSON page views ``{"url", "user", "ts", "seq"}``), two outputs:

* ``PAGEVIEWS_OUTPUT`` (default ``pageview-counts``): running count per url, one message per
  url whose count changed in the batch;
* ``PAGEVIEWS_WINDOW_OUTPUT`` (default ``pageview-window-counts``): every second, the count
  of each url over the last 10 seconds (incremental: add the newest slide, subtract the
  slide that left; urls whose count fell to zero are dropped).

The window and slide must be multiples of the batch interval (1 s and 500 ms both work).

Run it: ``dstream run examples/windowed_pageviews.py --workers 2``.
"""

import operator
import os

from engine import StreamingContext


def _nonzero(kv: tuple[str, int]) -> bool:
    return kv[1] != 0


def build(ssc: StreamingContext) -> None:
    views = ssc.kafka_stream(os.environ.get("PAGEVIEWS_TOPIC", "pageviews"), value_format="json")
    ones = views.map(lambda event: (event["url"], 1))
    counts = ones.reduce_by_key(operator.add).running_reduce(operator.add)
    counts.to_kafka(os.environ.get("PAGEVIEWS_OUTPUT", "pageview-counts"))
    windowed = ones.reduce_by_key_and_window(
        operator.add, operator.sub, window="10s", slide="1s", filter_fn=_nonzero
    )
    windowed.to_kafka(os.environ.get("PAGEVIEWS_WINDOW_OUTPUT", "pageview-window-counts"))
