"""The chart's pods as real containers, under the operations a cluster puts them through.

One install (the module's ``fleet``), then the scenarios of issue 10 in order; after each,
``dstream verify`` checks the committed output (read_committed) against the reference over
the WHOLE input produced so far, and the record count it read must be everything produced.
Timings of every scenario go to test-output/deploy/timings.json.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from tests.deploy.conftest import OUT_DIR, Deployed, check_verify, finish_producer

#: Records produced so far (the fixture's first 1,000 plus every scenario's), across tests.
PRODUCED = {"records": 1000}
TIMINGS: dict[str, dict[str, float]] = {}
#: Issue 10: batches flow again within 10 s of the new coordinator's start.
COORDINATOR_RESUME_S = 10.0
#: Every scenario that changes pods waits this long for them; generous for 2 cores.
READY_TIMEOUT_S = 150.0


def _record(name: str, **values: float) -> None:
    TIMINGS.setdefault(name, {}).update({k: round(v, 2) for k, v in values.items()})
    (OUT_DIR / "timings.json").write_text(json.dumps(TIMINGS, indent=1))


def _produced(summary: str) -> int:
    m = re.match(r"produced (\d+) records", summary)
    assert m, summary
    return int(m.group(1))


def _verify_all(fleet: Deployed) -> float:
    """Exact verify of everything produced so far; returns the seconds it took."""
    took = check_verify(fleet)
    proc = fleet.verify(wait=0)  # cheap re-read: the record count of the reference
    m = re.search(r"reference over (\d+) records", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    assert int(m.group(1)) == PRODUCED["records"], (m.group(1), PRODUCED)
    return took


def _no_sigkill(fleet: Deployed, since: float) -> None:
    """Every graceful deletion since *since* ended on SIGTERM, within the grace period."""
    killed = [
        (e.pod, e.detail)
        for e in fleet.cluster.events
        if e.at >= since and e.what == "deleted" and e.detail.get("grace") and e.detail["sigkill"]
    ]
    assert not killed, f"pods that ignored SIGTERM for their whole grace period: {killed}"


def _no_restarts(fleet: Deployed) -> None:
    restarted = {p.name: p.restarts for p in fleet.cluster.running() if p.restarts}
    assert not restarted, f"containers restarted (liveness or exit): {restarted}"


@pytest.mark.timeout(600)
def test_a_install_and_steady_input(fleet: Deployed) -> None:
    """Install, then 60 s of input at 2,000 records/s: the output is exact."""
    t0 = time.monotonic()
    summary = finish_producer(fleet.produce(rate=2000, seconds=60, seed=11))
    records = _produced(summary)
    PRODUCED["records"] += records
    assert records >= 0.95 * 2000 * 60, f"the input fell short of 2,000 records/s: {summary}"
    took = _verify_all(fleet)
    _no_restarts(fleet)
    _record(
        "a_install",
        install_ready_s=fleet.timings["install_ready_s"],
        first_output_s=fleet.timings["first_output_s"],
        input_s=60,
        input_records=records,
        verify_s=took,
        total_s=time.monotonic() - t0 + fleet.timings["install_ready_s"],
    )


@pytest.mark.timeout(600)
def test_b_rolling_restart_of_workers(fleet: Deployed) -> None:
    """``kubectl rollout restart`` of the workers mid-stream: one at a time, highest first."""
    t0 = time.monotonic()
    cluster = fleet.cluster
    sts = cluster.workload("StatefulSet")
    pdb = cluster.of_kind("PodDisruptionBudget")
    max_unavailable = int(pdb[0]["spec"]["maxUnavailable"]) if pdb else 1
    before = {p.name: p.container for p in fleet.workers}
    producer = fleet.produce(rate=1000, seconds=40, seed=12)
    time.sleep(5)
    worst = {"unavailable": 0}
    stop = threading.Event()

    def watch() -> None:  # what the PDB bounds: workers not ready at any moment
        while not stop.is_set():
            ready = sum(1 for p in cluster.owned(sts) if p.ready and not p.deleting.is_set())
            worst["unavailable"] = max(worst["unavailable"], sts.replicas - ready)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cluster.rollout_restart(sts)
    rollout = cluster.wait_ready(sts, READY_TIMEOUT_S * sts.replicas)
    stop.set()
    watcher.join()
    order = [e.pod for e in cluster.events if e.at >= t0 and e.what == "rolling-update"]
    assert order == sorted(before, key=lambda n: -int(n.rsplit("-", 1)[1])), order
    assert {p.name for p in fleet.workers} == set(before), "StatefulSet pods keep their names"
    assert worst["unavailable"] <= max_unavailable, worst
    PRODUCED["records"] += _produced(finish_producer(producer))
    took = _verify_all(fleet)
    _no_sigkill(fleet, t0)
    _record("b_rolling_restart", rollout_s=rollout, verify_s=took, total_s=time.monotonic() - t0)


def _replace_coordinator(fleet: Deployed) -> tuple[float, float]:
    """Delete the (leading) coordinator pod; return when its successor was ready and when
    it completed a batch, in seconds after the new pod started."""
    cluster = fleet.cluster
    old = next(p for p in fleet.coordinators if p.ready)
    epoch = fleet.status()["epoch"]
    cluster.delete_pod(old.name)
    cluster.wait(
        lambda: any(p.name != old.name and p.phase == "Running" for p in fleet.coordinators),
        READY_TIMEOUT_S,
        "a new coordinator pod",
    )
    new = next(p for p in fleet.coordinators if p.name != old.name)
    assert new.name.rsplit("-", 1)[0] == old.name.rsplit("-", 1)[0], (old.name, new.name)

    def flowing() -> bool:
        if not new.ready:
            return False
        try:
            st = fleet.status()
        except OSError:
            return False
        done = [b for b in st["batches"] if b.get("total_delay") is not None]
        return st["epoch"] > epoch and bool(done)

    cluster.wait(flowing, READY_TIMEOUT_S, "batches completed by the new coordinator")
    resumed = time.monotonic() - new.started_at
    ready_after = (
        next(e.at for e in cluster.events if e.pod == new.name and e.what == "ready")
        - new.started_at
    )
    return ready_after, resumed


@pytest.mark.timeout(600)
def test_c_coordinator_deleted_and_recreated(fleet: Deployed) -> None:
    """The coordinator pod deleted mid-stream: workers keep running, batches resume in 10 s."""
    t0 = time.monotonic()
    workers = {p.name: (p.container, p.generation) for p in fleet.workers}
    producer = fleet.produce(rate=1000, seconds=25, seed=13)
    time.sleep(5)
    ready_after, resumed = _replace_coordinator(fleet)
    assert {p.name: (p.container, p.generation) for p in fleet.workers} == workers, (
        "workers were restarted or replaced"
    )
    PRODUCED["records"] += _produced(finish_producer(producer))
    took = _verify_all(fleet)
    _no_sigkill(fleet, t0)
    _no_restarts(fleet)
    _record(
        "c_coordinator",
        new_ready_s=ready_after,
        batches_resumed_s=resumed,
        verify_s=took,
        total_s=time.monotonic() - t0,
    )
    assert resumed <= COORDINATOR_RESUME_S, f"batches resumed {resumed:.1f} s after start"


@pytest.mark.timeout(600)
def test_d_workers_scaled_2_4_3(fleet: Deployed) -> None:
    """Workers scaled 2 -> 4 -> 3 mid-stream (scale-down removes the highest ordinals)."""
    t0 = time.monotonic()
    cluster = fleet.cluster
    sts = cluster.workload("StatefulSet")
    cluster.scale(sts, 2)
    cluster.wait_ready(sts, READY_TIMEOUT_S)
    producer = fleet.produce(rate=1000, seconds=35, seed=14)
    time.sleep(5)
    cluster.scale(sts, 4)
    up = cluster.wait_ready(sts, READY_TIMEOUT_S)
    time.sleep(8)
    cluster.scale(sts, 3)
    down = cluster.wait_ready(sts, READY_TIMEOUT_S)
    names = sorted(p.name for p in fleet.workers)
    assert names == [f"{sts.name}-{i}" for i in range(3)], names
    PRODUCED["records"] += _produced(finish_producer(producer))
    cluster.wait(
        lambda: len(fleet.status()["workers"]) == 3, READY_TIMEOUT_S, "3 registered workers"
    )
    took = _verify_all(fleet)
    _no_sigkill(fleet, t0)
    _record("d_scale", up_s=up, down_s=down, verify_s=took, total_s=time.monotonic() - t0)


@pytest.mark.timeout(600)
def test_e_worker_sigkilled_and_recreated(fleet: Deployed) -> None:
    """A worker killed with SIGKILL (force delete) and recreated under the same name."""
    t0 = time.monotonic()
    cluster = fleet.cluster
    sts = cluster.workload("StatefulSet")
    victim = fleet.workers[1]
    producer = fleet.produce(rate=1000, seconds=20, seed=15)
    time.sleep(5)
    result = cluster.delete_pod(victim.name, grace=0)
    assert result["sigkill"], result
    back = cluster.wait_ready(sts, READY_TIMEOUT_S)
    again = cluster.pod(victim.name)
    assert again is not victim and again.container == victim.container, "same name, new pod"
    PRODUCED["records"] += _produced(finish_producer(producer))
    took = _verify_all(fleet)
    _record("e_sigkill", recreated_ready_s=back, verify_s=took, total_s=time.monotonic() - t0)


@pytest.mark.timeout(600)
def test_f_coordinator_recreated_below_the_rendered_replicas(fleet: Deployed) -> None:
    """Scaled below the chart's replica count (``--expect-workers``), then the coordinator
    deleted: the app has run before, so the new one resumes with the workers that rejoin
    instead of waiting for the missing one."""
    t0 = time.monotonic()
    cluster = fleet.cluster
    sts = cluster.workload("StatefulSet")
    cluster.scale(sts, 2)
    cluster.wait_ready(sts, READY_TIMEOUT_S)
    producer = fleet.produce(rate=1000, seconds=25, seed=16)
    time.sleep(5)
    ready_after, resumed = _replace_coordinator(fleet)
    PRODUCED["records"] += _produced(finish_producer(producer))
    took = _verify_all(fleet)
    cluster.scale(sts, 3)
    cluster.wait_ready(sts, READY_TIMEOUT_S)
    _record(
        "f_coordinator_below_replicas",
        new_ready_s=ready_after,
        batches_resumed_s=resumed,
        verify_s=took,
        total_s=time.monotonic() - t0,
    )
    assert resumed <= COORDINATOR_RESUME_S, f"batches resumed {resumed:.1f} s after start"
