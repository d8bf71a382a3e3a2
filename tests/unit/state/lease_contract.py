"""The leader lease's contract, run against every :class:`state.metalog.MetaLog` backend."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from engine.errors import FencedError
from state.metalog import MetaLog

TTL = 1.0


def check_one_leader_at_a_time(log: MetaLog) -> None:
    a = log.acquire_lease("10.0.0.1:7070", TTL)
    assert a is not None and a.holder == "10.0.0.1:7070"
    assert log.acquire_lease("10.0.0.2:7070", TTL) is None, "a held lease is not taken"
    assert log.leader() == a
    assert log.epoch() == a.epoch, "taking the lease bumps the epoch: the fencing token"


def check_expiry_hands_over_and_fences(log: MetaLog) -> None:
    a = log.acquire_lease("10.0.0.1:7070", TTL)
    assert a is not None
    log.log_batch(a.epoch, 0, {}, 0)
    time.sleep(TTL + 0.3)  # the leader stopped renewing (killed, paused)
    b = log.acquire_lease("10.0.0.2:7070", TTL)
    assert b is not None and b.epoch > a.epoch
    assert not log.renew_lease(a, TTL), "the deposed leader cannot renew"
    with pytest.raises(FencedError):
        log.log_batch(a.epoch, 1, {}, 0)
    with pytest.raises(FencedError):
        log.mark_done(a.epoch, 0)
    with pytest.raises(FencedError):
        log.set_checkpoint(a.epoch, 1, 0, 0)
    log.log_batch(b.epoch, 1, {}, 0)
    assert log.leader() == b


def check_renewal_keeps_it(log: MetaLog) -> None:
    a = log.acquire_lease("10.0.0.1:7070", TTL)
    assert a is not None
    for _ in range(4):
        time.sleep(TTL / 3)
        assert log.renew_lease(a, TTL)
    assert log.acquire_lease("10.0.0.2:7070", TTL) is None


def check_lapsed_lease_is_taken_back_while_the_epoch_stands(log: MetaLog) -> None:
    a = log.acquire_lease("10.0.0.1:7070", TTL)
    assert a is not None
    time.sleep(TTL + 0.3)  # e.g. redis was down longer than the lease; nobody took over
    assert log.renew_lease(a, TTL)
    assert log.leader() == a


def check_release_and_restart_of_the_same_address(log: MetaLog) -> None:
    a = log.acquire_lease("10.0.0.1:7070", TTL)
    assert a is not None
    # the same address again: a restart of a dead process (it could bind the address)
    again = log.acquire_lease("10.0.0.1:7070", TTL)
    assert again is not None and again.epoch > a.epoch
    log.release_lease(a)  # an old lease releases nothing
    assert log.leader() == again
    log.release_lease(again)
    assert log.leader() is None
    b = log.acquire_lease("10.0.0.2:7070", TTL)
    assert b is not None, "a released lease is taken at once"


CHECKS: list[Callable[[MetaLog], None]] = [
    check_one_leader_at_a_time,
    check_expiry_hands_over_and_fences,
    check_renewal_keeps_it,
    check_lapsed_lease_is_taken_back_while_the_epoch_stands,
    check_release_and_restart_of_the_same_address,
]
