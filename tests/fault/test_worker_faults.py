"""kill -9 of workers (at each crash point, both holders of a block, two of four)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ops.faults import CRASH_POINTS
from tests.fault.scenario import status
from tests.fleetkit import Fleet, role_pids, wait_for


def _no_fault(fleet: Fleet, port: int) -> None:
    """The crash switch does the killing."""


def _kill_workers(n: int):
    def fault(fleet: Fleet, port: int) -> None:
        pids = role_pids(fleet, "worker")
        assert len(pids) >= n
        for pid in pids[:n]:
            os.kill(pid, signal.SIGKILL)

    return fault


@pytest.mark.parametrize("point", [p for p in CRASH_POINTS if p != "coordinator_seal"])
def test_worker_crash_at_each_point(point: str, scenario, tmp_path) -> None:
    env = {"DSTREAM_FAULT_CRASH": point}
    fault = _no_fault
    if point == "during_recovery":
        # a worker dies while re-reading a lost block from Kafka: kill both holders of some
        # blocks, with no checkpoint to spare the rebuild, so that re-reads must happen
        fault = _kill_workers(2)
        env["DSTREAM_CHECKPOINT_EVERY"] = "100000"
    res = scenario(fault=fault, env=env)
    assert (tmp_path / f"crash-{point}").exists(), f"no worker reached {point}"
    assert "starting a new one" in res["log"]


def test_kill_both_holders_of_blocks(scenario, tmp_path):
    # 3 workers replicate each block to the next one: killing two kills both copies of some.
    # No checkpoint during the run: the lost state partitions are rebuilt from batch 0, so
    # inputs whose two copies died must be re-read from Kafka (with checkpoints every few
    # batches, whether any lost block is still needed depends on when the kill lands)
    res = scenario(
        fault=_kill_workers(2),
        env={"DSTREAM_CHECKPOINT_EVERY": "100000"},
    )
    stats = res["status"]["stats"]
    assert stats["recomputed"] > 0, stats
    assert stats["reread"] > 0, stats


def test_kill_two_of_four_workers(scenario, tmp_path):
    res = scenario(
        fault=_kill_workers(2),
        workers=4,
    )
    assert len(res["status"]["workers"]) == 4  # replaced, rejoined


def test_kill_coordinator(scenario, tmp_path):
    def fault(fleet: Fleet, port: int) -> None:
        (pid,) = role_pids(fleet, "coordinator")
        os.kill(pid, signal.SIGKILL)

    res = scenario(
        fault=fault,
    )
    assert res["status"]["epoch"] >= 2


def test_paused_worker_commits_nothing(scenario, tmp_path):
    paused: list[int] = []

    def fault(fleet: Fleet, port: int) -> None:
        pid = role_pids(fleet, "worker")[0]
        os.kill(pid, signal.SIGSTOP)
        paused.append(pid)
        # past its lease: the coordinator declares it lost and moves its work
        wait_for(lambda: len(status(port)["workers"]) == 2, 30, "the pause to be noticed")
        time.sleep(1.0)
        os.kill(pid, signal.SIGCONT)

    res = scenario(
        fault=fault,
    )
    assert (
        "is unknown to the coordinator (declared lost, or a new coordinator); rejoining"
        in res["log"]
    )
    assert len(res["status"]["workers"]) == 3  # it rejoined cleanly
