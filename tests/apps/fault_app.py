"""Page-view running counts written exactly once to Kafka and to a Redis hash."""

import operator
import os

from engine import StreamingContext


def build(ssc: StreamingContext) -> None:
    views = ssc.kafka_stream(os.environ["PAGEVIEWS_TOPIC"], value_format="json")
    counts = views.map(lambda e: (e["url"], 1)).reduce_by_key(operator.add)
    running = counts.running_reduce(operator.add)
    running.to_kafka(os.environ["PAGEVIEWS_OUTPUT"])
    running.to_redis(mode="hash", hash_name="counts")
