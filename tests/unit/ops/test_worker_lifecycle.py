"""A worker's shutdown paths and its life across coordinators, with no Kafka or Redis.

The worker runs as its own process (``dstream worker``), as deployed; the coordinator is
a real :class:`ops.coordinator.Coordinator` in this process over an in-memory metadata
log, and the app reads a ``queue_stream``, so no service is needed. Each test sends the
signal a kubelet sends (SIGTERM) and checks the process ends, with code 0, in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from ops.config import load_settings
from ops.coordinator import Coordinator
from ops.tools.devservices import free_port
from ops.worker import STOP_DEADLINE_S
from state.metalog import Lease, MemoryMetaLog

SECRET = "worker-lifecycle-test-secret"

APP = """
import os
import time
from pathlib import Path


def slow(x):
    marker = os.environ.get("TEST_TASK_MARKER")
    if marker and x == "slow":
        Path(marker).touch()
        time.sleep(float(os.environ.get("TEST_TASK_SECONDS", "0")))
    return (x, 1)


def build(ssc):
    ssc.queue_stream([], default=["slow"]).map(slow).reduce_by_key(lambda a, b: a + b).pprint()
"""


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def app(tmp_path: Path) -> Path:
    path = tmp_path / "app.py"
    path.write_text(APP)
    return path


def _coordinator(app: Path, port: int, metalog: MemoryMetaLog) -> Coordinator:
    settings = load_settings(
        secret=SECRET,
        coordinator=f"127.0.0.1:{port}",
        http_port=0,
        kafka_bootstrap="127.0.0.1:9",
        redis_url="redis://127.0.0.1:9/0",
        batch_interval=0.2,
        checkpoint_every=100000,
    )
    c = Coordinator(settings, str(app), "lifecycle", expect_workers=1, metalog=metalog)
    c.start()
    assert c.wait_leading(10), "a lone coordinator takes the free lease"
    return c


class WorkerProc:
    """A ``dstream worker`` process; its log goes to a file the test can read."""

    def __init__(self, app: Path, tmp: Path, coordinator_port: int, **env: str) -> None:
        self.http_port = free_port()
        self.log = tmp / "worker.log"
        full = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DSTREAM_")},
            "DSTREAM_SECRET": SECRET,
            "DSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:9",
            "DSTREAM_REDIS_URL": "redis://127.0.0.1:9/0",
            "DSTREAM_BATCH_INTERVAL": "0.2",
            "DSTREAM_CHECKPOINT_EVERY": "100000",
            **env,
        }
        cmd = [sys.executable, "-m", "ops.cli", "worker", "--app", str(app)]
        cmd += ["--coordinator", f"127.0.0.1:{coordinator_port}", "--rpc-port", "0"]
        cmd += ["--http-port", str(self.http_port)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=full, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def live(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/livez", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def terminate(self) -> tuple[int, float]:
        """SIGTERM, then the exit code and how long the process took to end."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_DEADLINE_S + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"worker ignored SIGTERM:\n{self.text()}") from None
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def workers() -> Iterator[list[WorkerProc]]:
    made: list[WorkerProc] = []
    yield made
    for w in made:
        w.kill()


def test_sigterm_before_registration_ends_the_worker(
    app: Path, tmp_path: Path, workers: list[WorkerProc]
) -> None:
    nobody = free_port()  # no coordinator listens here
    w = WorkerProc(app, tmp_path, nobody)
    workers.append(w)
    _wait(lambda: "no leading coordinator" in w.text(), 20, "the unreachable coordinator warning")
    assert " WARNING " in w.text(), "an unreachable coordinator is said at warning level"
    assert w.live(), "the worker serves its probes before it registers"
    code, took = w.terminate()
    assert code == 0, w.text()
    assert took < 5, f"SIGTERM before registration took {took:.1f} s"
    assert w.text().count("no leading coordinator") == 1, "said once, not per attempt"


def test_sigterm_during_a_batch_ends_within_the_stop_deadline(
    app: Path, tmp_path: Path, workers: list[WorkerProc]
) -> None:
    port = free_port()
    c = _coordinator(app, port, MemoryMetaLog())
    try:
        marker = tmp_path / "task-started"
        # the task sleeps far past the grace period: the stop deadline must bound it
        w = WorkerProc(app, tmp_path, port, TEST_TASK_MARKER=str(marker), TEST_TASK_SECONDS="120")
        workers.append(w)
        _wait(marker.exists, 30, "a task to start running")
        code, took = w.terminate()
    finally:
        c.stop()
    assert code == 0, w.text()
    assert took < STOP_DEADLINE_S + 5, f"SIGTERM during a batch took {took:.1f} s"
    assert "abandoned" in w.text(), w.text()


def test_worker_outlives_its_coordinator_and_joins_the_next(
    app: Path, tmp_path: Path, workers: list[WorkerProc]
) -> None:
    port = free_port()
    metalog = MemoryMetaLog()
    first = _coordinator(app, port, metalog)
    w = WorkerProc(app, tmp_path, port)
    workers.append(w)
    try:
        _wait(lambda: len(first.workers) == 1, 30, "the worker to register")
        _wait(lambda: (first.done or -1) >= 3, 30, "batches to complete")
    finally:
        first.stop()
    # the coordinator is gone for longer than the worker's lease: the worker stays up
    time.sleep(2.5)
    assert w.proc.poll() is None, w.text()
    assert w.live(), "the worker is alive without a coordinator"
    assert "coordinator 127.0.0.1" in w.text() and " lost " in w.text(), w.text()

    second = _coordinator(app, port, metalog)
    try:
        assert second.epoch > first.epoch
        t0 = time.monotonic()
        _wait(lambda: len(second.workers) == 1, 10, "the worker to join the new coordinator")
        done_before = second.done
        _wait(
            lambda: second.done is not None and second.done > (done_before or first.done or 0),
            10 - (time.monotonic() - t0),
            "batches to flow again under the new coordinator",
        )
        assert f"epoch {first.epoch} -> {second.epoch}" in w.text(), w.text()
        code, took = w.terminate()
    finally:
        second.stop()
    assert code == 0, w.text()
    assert took < 5, f"SIGTERM with a coordinator took {took:.1f} s"


def test_sigterm_after_the_coordinator_vanished(
    app: Path, tmp_path: Path, workers: list[WorkerProc]
) -> None:
    port = free_port()
    c = _coordinator(app, port, MemoryMetaLog())
    w = WorkerProc(app, tmp_path, port)
    workers.append(w)
    try:
        _wait(lambda: len(c.workers) == 1, 30, "the worker to register")
    finally:
        c.stop()
    _wait(lambda: " lost " in w.text(), 10, "the worker to notice the coordinator is gone")
    code, took = w.terminate()
    assert code == 0, w.text()
    assert took < 5, f"SIGTERM without a coordinator took {took:.1f} s"


def test_calls_of_a_deposed_coordinator_are_refused(app: Path) -> None:
    """A worker refuses a call that carries an epoch older than its leader's."""
    from engine.errors import FencedError
    from ops import metrics
    from ops.worker import COORDINATOR_CALLS, Worker

    settings = load_settings(
        secret=SECRET,
        coordinator="127.0.0.1:9",
        rpc_port=0,
        kafka_bootstrap="127.0.0.1:9",
        redis_url="redis://127.0.0.1:9/0",
    )
    w = Worker(settings, str(app), "fencing")
    w.epoch = 5  # registered with the leader of epoch 5
    refused = metrics.FENCED.labels(role="worker")
    before = refused._value.get()
    for method in sorted(COORDINATOR_CALLS):
        with pytest.raises(FencedError, match="epoch 4 refused"):
            w._handle(method, {"epoch": 4, "blocks": [], "batch": 1}, None)
    assert refused._value.get() - before == len(COORDINATOR_CALLS)
    assert w._handle("free", {"epoch": 5, "blocks": []}, None) == 0, "the leader's call runs"
    assert {"seal", "launch", "assign"} <= COORDINATOR_CALLS


class _CutOffMetaLog(MemoryMetaLog):
    """A metadata log the test can cut off, as an unreachable Redis is."""

    cut_off = False

    def renew_lease(self, lease: Lease, ttl_s: float) -> bool:
        if self.cut_off:
            raise redis.ConnectionError("cut off by the test")
        return super().renew_lease(lease, ttl_s)


def test_a_coordinator_whose_lease_lapsed_acts_no_more(app: Path) -> None:
    """Unable to renew its lease, a leader stops sealing and granting commits in time."""
    metalog = _CutOffMetaLog()
    c = _coordinator(app, free_port(), metalog)
    try:
        assert c.leads()
        metalog.cut_off = True
        _wait(lambda: not c.leads(), c.settings.lease_seconds + 1, "the lease to be in doubt")
        next_batch = c.next_batch
        c.leader.clock.seal_batch(0)
        assert c.next_batch == next_batch, "no batch was cut"
        task = {"task": "out/1/0/0", "attempt": 0, "worker": "w"}
        assert c._handle("request_commit", task, None) == "wait"
        assert c.refused >= 2
        assert c.holds_lease(), "in doubt is not deposed: it still answers its workers"
        metalog.cut_off = False
        _wait(c.leads, 2, "the renewed lease")
    finally:
        c.stop()
