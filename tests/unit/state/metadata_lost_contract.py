"""Lost metadata's contract, run against every :class:`state.metalog.MetaLog` backend.

Each check takes the log and a ``wipe`` that loses every key of the app, as ``FLUSHALL``
or a failover to an empty replica does. A missing epoch is an error in every fence
(:class:`MetadataLostError`), never epoch 0.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from engine.errors import FencedError, MetadataLostError
from state.metalog import MetaLog, OffsetRange

TTL = 5.0
RANGE = {"in/0/0/0": OffsetRange("t", 0, 0, 10, 10)}


def check_every_fence_refuses_a_missing_epoch(log: MetaLog, wipe: Callable[[], None]) -> None:
    a = log.acquire_lease("10.0.0.1:7070", TTL)
    assert a is not None
    log.log_batch(a.epoch, 0, RANGE, 1000)
    log.mark_done(a.epoch, 0)
    log.set_checkpoint(a.epoch, 1, 0, 0)
    wipe()
    for epoch in (a.epoch, 0):  # 0: what a missing epoch used to read as
        with pytest.raises(MetadataLostError, match="METADATA_LOST"):
            log.log_batch(epoch, 1, RANGE, 2000)
        with pytest.raises(MetadataLostError):
            log.mark_done(epoch, 1)
        with pytest.raises(MetadataLostError):
            log.set_checkpoint(epoch, 1, 0, 1)
    assert log.logged() == {} and log.done() is None and log.checkpoints() == {}, (
        "nothing is written past a lost epoch"
    )


def check_renewal_after_a_wipe_is_metadata_lost(log: MetaLog, wipe: Callable[[], None]) -> None:
    a = log.acquire_lease("10.0.0.1:7070", TTL)
    assert a is not None and log.renew_lease(a, TTL)
    wipe()
    with pytest.raises(MetadataLostError):
        log.renew_lease(a, TTL)
    assert log.leader() is None, "the lost lease is not taken back"


def check_fencing_still_refuses_an_older_epoch(log: MetaLog, wipe: Callable[[], None]) -> None:
    a = log.acquire_lease("10.0.0.1:7070", TTL)
    assert a is not None
    newer = log.bump_epoch()
    with pytest.raises(FencedError):
        log.log_batch(a.epoch, 0, RANGE, 1000)
    log.log_batch(newer, 0, RANGE, 1000)
    assert log.logged()[0].ranges == RANGE
    del wipe


def check_incarnation_is_set_once(log: MetaLog, wipe: Callable[[], None]) -> None:
    assert log.incarnation() is None, "a new app has no incarnation"
    assert log.create_incarnation("aaa") == "aaa"
    assert log.create_incarnation("bbb") == "aaa", "the first one stays"
    assert log.incarnation() == "aaa"
    wipe()
    assert log.incarnation() is None, "a wipe loses it with the rest"


CHECKS: list[Callable[[MetaLog, Callable[[], None]], None]] = [
    check_every_fence_refuses_a_missing_epoch,
    check_renewal_after_a_wipe_is_metadata_lost,
    check_fencing_still_refuses_an_older_epoch,
    check_incarnation_is_set_once,
]
