"""Lost Redis metadata in the coordinator's roles: the start check, the election, reports.

No services: markers are given as values, the metadata log is the in-memory one.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from engine.errors import MetadataLostError
from ops import protocol as wire
from ops.coordinator import _FatalOnLost
from ops.coordinator.leader import Leader
from ops.coordinator.leadership import LeaderElection
from ops.markers import Marker, check_markers, marker_group_re
from state.metalog import Lease, MemoryMetaLog
from tests.unit.ops.test_coordinator_roles import (
    LAYOUT,
    FakeWorker,
    InlineIO,
    _plan,
    _settings,
)


def _marker(batch: int, incarnation: str, group: str = "pv-3-0-commits") -> Marker:
    return Marker(group, "out", 0, batch, incarnation)


# -- the start check ------------------------------------------------------------------------
def test_marker_groups_are_the_apps_own() -> None:
    pattern = marker_group_re("pv")
    assert pattern.match("pv-3-0-commits") and pattern.match("pv-dead-letters-commits")
    assert not pattern.match("pv-2-3-0-commits"), "app pv-2's group is not pv's"
    assert not pattern.match("pv-3-0-commits-x") and not pattern.match("xpv-3-0-commits")
    assert not pattern.match("dstream-pv-receivers")


def test_no_markers_start_whatever_redis_holds() -> None:
    check_markers("pv", None, [])
    check_markers("pv", "abc", [])


def test_markers_without_metadata_refuse_with_one_line_that_says_what_to_do() -> None:
    markers = [_marker(4, "old"), _marker(11, "old", "pv-3-1-commits")]
    with pytest.raises(MetadataLostError) as e:
        check_markers("pv", None, markers)
    assert str(e.value) == (
        "app pv has output commit markers in Kafka (batch 11 of incarnation old) but no "
        "metadata in Redis: its Redis data was lost. Restore Redis from a backup, or run "
        "`dstream reset --app-id pv` to start the app fresh"
    )
    assert "\n" not in str(e.value)


def test_markers_of_another_incarnation_refuse() -> None:
    check_markers("pv", "mine", [_marker(4, "mine")], last_logged=4)
    check_markers("pv", "mine", [_marker(4, "")], 9)  # a marker without an id: no incarnation
    with pytest.raises(MetadataLostError, match=r"incarnation old .* incarnation mine"):
        check_markers("pv", "mine", [_marker(4, "mine"), _marker(2, "old")], 9)


def test_markers_ahead_of_the_log_refuse() -> None:
    """An older Redis backup (or a failover that lost the last writes): same incarnation,
    but the sink would skip the batches between the log's end and the markers."""
    with pytest.raises(MetadataLostError, match=r"up to batch 12 .* only up to batch 7"):
        check_markers("pv", "mine", [_marker(12, "mine"), _marker(5, "mine")], 7)
    with pytest.raises(MetadataLostError, match="only up to batch none"):
        check_markers("pv", "mine", [_marker(0, "")], None)


# -- the election ---------------------------------------------------------------------------
def _election(metalog: MemoryMetaLog, on_lead: Any) -> tuple[LeaderElection, threading.Event]:
    stopping = threading.Event()
    e = LeaderElection(metalog, lambda: "me:1", 2.0, stopping, on_lead, lambda: None)
    return e, stopping


def test_a_refused_start_stops_releases_the_lease_and_never_leads() -> None:
    metalog = MemoryMetaLog()

    def refuse(_lease: Lease) -> None:
        check_markers("pv", metalog.incarnation(), [_marker(3, "old")])

    e, stopping = _election(metalog, refuse)
    e.run()  # returns: the refusal is fatal, not retried
    assert stopping.is_set() and e.lost is not None and "no metadata in Redis" in e.lost
    assert not e.leading.is_set() and not e.holds_lease() and not e.may_act("seal")
    assert metalog.leader() is None, "the lease is handed back"
    assert not e.deposed, "not a lost leadership"


def test_a_renewal_that_finds_no_epoch_stops_the_leader() -> None:
    metalog = MemoryMetaLog()
    e, stopping = _election(metalog, lambda _lease: None)
    t = threading.Thread(target=e.run, daemon=True)
    t.start()
    assert e.leading.wait(5) and e.leads()
    metalog.wipe()  # FLUSHALL
    t.join(5)  # the next renewal (every lease / 4 = 0.5 s)
    assert not t.is_alive() and stopping.is_set()
    assert e.lost is not None and "METADATA_LOST" in e.lost
    assert not e.leads() and not e.holds_lease()


def test_a_durable_write_past_a_wipe_reports_the_loss_at_once() -> None:
    metalog = MemoryMetaLog()
    epoch = metalog.bump_epoch()
    lost: list[str] = []
    fenced: list[bool] = []
    durable = _FatalOnLost(threading.Event(), lambda: fenced.append(True), lost.append)
    durable.write("logging a batch", metalog.log_batch, epoch, 0, {}, 0)
    metalog.wipe()
    with pytest.raises(MetadataLostError):
        durable.write("logging a batch", metalog.log_batch, epoch, 1, {}, 0)
    assert len(lost) == 1 and "METADATA_LOST" in lost[0] and not fenced


# -- the leader -----------------------------------------------------------------------------
def test_workers_learn_the_incarnation_and_a_lost_report_stops_the_coordinator() -> None:
    metalog = MemoryMetaLog()
    lease = metalog.acquire_lease("me:1", 10)
    assert lease is not None
    metalog.create_incarnation("inc-1")
    resume = Leader.load(metalog, lease.epoch)
    assert resume.incarnation == "inc-1"
    positions = Leader.positions(LAYOUT, resume, lambda need: {(n, i): 0 for n, i, *_ in need})
    failed: list[str] = []
    lost: list[str] = []
    ld = Leader(
        settings=_settings(speculation=False),
        app_id="roles",
        holder="me:1",
        plan=_plan(),
        layout=LAYOUT,
        interval_ms=1000,
        expect_workers=1,
        resume=resume,
        positions=positions,
        metalog=metalog,
        checkpoints=type("S", (), {"delete_before": lambda *a: None})(),
        durable=_FatalOnLost(threading.Event(), lambda: None, lost.append),
        connect=lambda wid: FakeWorker(wid, positions),  # type: ignore[arg-type,return-value]
        io=InlineIO(),
        lock=threading.RLock(),
        stopping=threading.Event(),
        may_act=lambda _what: True,
        fail_app=failed.append,
        metadata_lost=lost.append,
    )
    reply = wire.RegisterReply.from_wire(ld.handlers["register"](wire.Register("w:1", 2).to_wire()))
    assert reply.incarnation == "inc-1" and reply.epoch == lease.epoch
    report = wire.TaskFailed(
        "out/3/0/0", 0, "w:1", "marker of another incarnation", wire.FailureKind.METADATA_LOST
    )
    assert ld.handlers["task_failed"](report.to_wire()) is True
    assert lost == ["task out/3/0/0: marker of another incarnation"] and not failed
