"""A slow worker: speculative copies are launched and win; the output stays exact."""

from __future__ import annotations

from tests.fleetkit import Fleet


def _nothing(fleet: Fleet, port: int) -> None:
    """The slow-task switch is the fault."""


def test_slow_worker_is_speculated(scenario, tmp_path):
    res = scenario(
        fault=_nothing,
        env={"DSTREAM_FAULT_SLOW": "5"},
    )
    assert (tmp_path / "slow").exists(), "no worker took the slow role"
    stats = res["status"]["stats"]
    assert stats["speculative_launched"] > 0, stats
    assert stats["speculative_won"] > 0, stats
