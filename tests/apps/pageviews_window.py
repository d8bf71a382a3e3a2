"""Page views: a running count per url and a 10 s window sliding every 1 s."""

import operator
import os

from engine import StreamingContext


def build(ssc: StreamingContext) -> None:
    views = ssc.kafka_stream(os.environ["PAGEVIEWS_TOPIC"], value_format="json")
    pairs = views.map(lambda e: (e["url"], 1))
    pairs.reduce_by_key(operator.add).running_reduce(operator.add).to_kafka(
        os.environ["COUNTS_OUTPUT"]
    )
    pairs.reduce_by_key_and_window(operator.add, operator.sub, 10, 1).to_kafka(
        os.environ["WINDOW_OUTPUT"]
    )
