"""Backpressure as a listener of completed batches (Spark's ``RateController``)."""

from __future__ import annotations

from ops.coordinator.completion import BatchInfo


class RateController:
    """Sizes a per-partition record cap so a batch processes in ~80% of the interval.

    Args:
        interval_s: the batch interval.
        partitions: how many input partitions share the input (at least 1 is assumed).
        max_records: the configured cap (0: none); the adaptive cap never exceeds it.

    :attr:`cap` is sent with every seal (None: the workers' configured cap). Sized from
    the rate the last batch was processed at, smoothed over batches.

    """

    def __init__(self, interval_s: float, partitions: int, max_records: int = 0) -> None:
        self.interval_s = interval_s
        self.partitions = max(1, partitions)
        self.max_records = max_records
        #: records per partition per batch (None: the workers' configured cap)
        self.cap: int | None = None

    def on_batch_completed(self, info: BatchInfo, processing_s: float) -> None:
        """A batch of ``info.records`` records processed in *processing_s* seconds."""
        if info.records < self.partitions or processing_s <= 0:
            return
        rate = info.records / processing_s  # records/s the fleet just sustained
        target = max(10, int(rate * self.interval_s * 0.8 / self.partitions))
        if self.max_records:
            target = min(target, self.max_records)
        old = self.cap
        self.cap = target if old is None else max(10, (old + target) // 2)
