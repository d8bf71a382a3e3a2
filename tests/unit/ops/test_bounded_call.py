"""A Kafka client call that hangs past its own timeout is given up on, not waited for."""

from __future__ import annotations

import threading
import time

import pytest

from ops import sinks
from ops.sinks import KafkaCallHung, bounded_call


def test_returns_the_value_and_raises_the_error_of_the_call() -> None:
    assert bounded_call("add", lambda a, b: a + b, 2, 3, timeout=1.0) == 5
    with pytest.raises(ZeroDivisionError):
        bounded_call("div", lambda: 1 / 0, timeout=1.0)


def test_a_call_blocking_past_its_timeout_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks, "HUNG_GRACE_S", 0.1)
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(KafkaCallHung, match="send_offsets_to_transaction did not return"):
        bounded_call("send_offsets_to_transaction", release.wait, 60, timeout=0.2)
    assert time.monotonic() - t0 < 5.0
    release.set()
