"""Prometheus metrics of the coordinator and the workers (prometheus-client).

Names follow Prometheus conventions: base units, ``_total`` counters, ``_seconds`` and
``_bytes`` suffixes. Every process registers all of them in the default registry; the
Grafana dashboard in ``helm/`` queries only names defined here (a test checks it).
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)

INPUT_RECORDS = Counter(
    "dstream_input_records_total", "Records received from Kafka", ["topic", "partition"]
)
BATCH_RECORDS = Histogram(
    "dstream_batch_records",
    "Input records per batch",
    buckets=(0, 10, 100, 1_000, 10_000, 100_000, 1_000_000),
)
SCHEDULING_DELAY = Histogram(
    "dstream_scheduling_delay_seconds",
    "Time from a batch's end to its first task starting",
    buckets=_DELAY_BUCKETS,
)
PROCESSING_TIME = Histogram(
    "dstream_processing_time_seconds",
    "Time from a batch's first task starting to its last output committing",
    buckets=_DELAY_BUCKETS,
)
TOTAL_DELAY = Histogram(
    "dstream_total_delay_seconds",
    "Time from a batch's end to its last output committing",
    buckets=_DELAY_BUCKETS,
)
BATCHES_PENDING = Gauge("dstream_batches_pending", "Batches generated but not yet complete")
BATCH_INTERVAL = Gauge(
    "dstream_batch_interval_seconds", "The batch interval the leading coordinator cuts batches at"
)
BATCHES_COMPLETED = Counter("dstream_batches_completed_total", "Batches fully committed")
RECEIVER_LAG = Gauge(
    "dstream_receiver_lag_records",
    "Log-end offset minus next offset to read, per partition",
    ["topic", "partition"],
)
TASK_DURATION = Histogram(
    "dstream_task_duration_seconds", "Task run time by stage", ["stage"], buckets=_DELAY_BUCKETS
)
LATE_SEALS = Counter(
    "dstream_late_seals_total",
    "Batches cut without a worker that did not answer the seal within half a batch interval",
)
MISSED_PROBES = Counter(
    "dstream_missed_probes_total",
    "Workers set apart for not answering a ping while one of their tasks ran long",
)
TASKS_RETRIED = Counter("dstream_tasks_retried_total", "Task attempts rerun after a failure")
SPECULATIVE_LAUNCHED = Counter(
    "dstream_speculative_tasks_launched_total", "Speculative task copies launched"
)
SPECULATIVE_WON = Counter(
    "dstream_speculative_tasks_won_total", "Speculative copies that finished first"
)
RECOVERIES = Counter("dstream_recoveries_total", "Recoveries of lost workers or state")
RECOVERY_TIME = Histogram(
    "dstream_recovery_seconds",
    "Time from a loss being detected to the fleet caught up",
    buckets=_DELAY_BUCKETS,
)
CHECKPOINT_DURATION = Histogram(
    "dstream_checkpoint_duration_seconds", "State checkpoint write time", buckets=_DELAY_BUCKETS
)
CHECKPOINT_BYTES = Gauge("dstream_checkpoint_size_bytes", "Bytes of the last state checkpoint")
CHECKPOINT_FAILURES = Counter(
    "dstream_checkpoint_failures_total", "State checkpoint writes that failed (lineage grows)"
)
BLOCK_STORE_BYTES = Gauge("dstream_block_store_bytes", "Bytes held by the worker block store")
BLOCK_STORE_BLOCKS = Gauge("dstream_block_store_blocks", "Blocks held by the worker block store")
DEAD_LETTERED = Counter(
    "dstream_dead_lettered_records_total", "Records sent to the dead-letter topic", ["reason"]
)
STUCK_TASKS = Gauge(
    "dstream_stuck_tasks",
    "Tasks that have kept failing for longer than task_retry_alert_seconds",
)
LIVE_WORKERS = Gauge("dstream_live_workers", "Workers with a current heartbeat")
DEGRADED = Gauge(
    "dstream_dependency_degraded",
    "1 while a dependency (kafka, redis) is unreachable",
    ["dependency"],
)
LEADER = Gauge("dstream_coordinator_leader", "1 while this coordinator holds the leader lease")
FENCED = Counter(
    "dstream_fenced_total",
    "Actions refused for want of a current epoch (worker: calls from a deposed coordinator; "
    "coordinator: actions it refused while its lease was in doubt or lost)",
    ["role"],
)

ALL_METRIC_NAMES = (
    "dstream_input_records_total",
    "dstream_batch_records",
    "dstream_scheduling_delay_seconds",
    "dstream_processing_time_seconds",
    "dstream_total_delay_seconds",
    "dstream_batches_pending",
    "dstream_batch_interval_seconds",
    "dstream_batches_completed_total",
    "dstream_receiver_lag_records",
    "dstream_task_duration_seconds",
    "dstream_tasks_retried_total",
    "dstream_late_seals_total",
    "dstream_missed_probes_total",
    "dstream_speculative_tasks_launched_total",
    "dstream_speculative_tasks_won_total",
    "dstream_recoveries_total",
    "dstream_recovery_seconds",
    "dstream_checkpoint_duration_seconds",
    "dstream_checkpoint_size_bytes",
    "dstream_checkpoint_failures_total",
    "dstream_block_store_bytes",
    "dstream_block_store_blocks",
    "dstream_dead_lettered_records_total",
    "dstream_stuck_tasks",
    "dstream_live_workers",
    "dstream_dependency_degraded",
    "dstream_coordinator_leader",
    "dstream_fenced_total",
)

# Label values known in advance are exported (at 0) from the start, so that a panel or an
# alert sees the series before the first event and rate()/increase() count the first one.
for _dependency in ("kafka", "redis"):
    DEGRADED.labels(dependency=_dependency)
for _reason in ("decode", "encode", "user"):  # ops.sinks.dead_letter_reason's values
    DEAD_LETTERED.labels(reason=_reason)
for _role in ("coordinator", "worker"):
    FENCED.labels(role=_role)


class _Off:
    """A metric that records nothing (``DSTREAM_METRICS=false``): every call is a no-op."""

    def labels(self, *args: Any, **kwargs: Any) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


def disable() -> None:
    """Turn every metric of this module into a no-op and stop exporting it.

    Called once at a role's start when ``DSTREAM_METRICS=false`` (the throughput benchmark
    measures what metrics cost this way); callers use ``metrics.NAME`` at call time, so
    the swap reaches them all. ``/metrics`` then serves only prometheus-client's own
    process and platform collectors.
    """
    from prometheus_client import REGISTRY

    module = globals()
    for name, value in list(module.items()):
        if isinstance(value, Counter | Gauge | Histogram):
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(value)
            module[name] = _Off()
