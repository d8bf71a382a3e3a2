"""Page views per url over the last 10 s, every 2 s: a sliding window with an inverse.

Input: JSON page views ``{"url", "user", "ts", "seq"}`` on topic ``pageviews`` (``dstream
produce`` writes them). Output: topic ``pageview-windows``; every 2 s (a slide), one message
per url seen so far: key = JSON url, value = JSON count of its views in the 10 s window
ending there. The window is incremental (``reduce_by_key_and_window(add, sub, "10s", "2s")``):
each slide adds the newest 2 s and subtracts the 2 s that left, so a url whose views all
left the window stays with count 0, as in Spark. Window and slide must be multiples of
the batch interval (1 s and 0.5 s both work).

Run it::

    dstream dev up
    dstream produce --topic pageviews --partitions 3 --rate 1000 --duration 60 &
    dstream run examples/windowed.py --workers 2

Topics can be renamed with ``PAGEVIEWS_TOPIC`` and ``PAGEVIEWS_WINDOW_OUTPUT``.
"""

import operator
import os

from engine import StreamingContext

WINDOW = "10s"
SLIDE = "2s"


def build(ssc: StreamingContext) -> None:
    views = ssc.kafka_stream(os.environ.get("PAGEVIEWS_TOPIC", "pageviews"), value_format="json")
    ones = views.map(lambda event: (event["url"], 1))
    windows = ones.reduce_by_key_and_window(operator.add, operator.sub, WINDOW, SLIDE)
    windows.to_kafka(os.environ.get("PAGEVIEWS_WINDOW_OUTPUT", "pageview-windows"))
