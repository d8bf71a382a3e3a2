"""Stage-level waiting: a reduce waits on a counter of its map stage's outputs.

The scheduler no longer keeps one waiter per (map output, reduce) pair: a parked reduce
waits until its map stage has every output available. These tests pin what that must keep:
the reduces start only when the whole stage is in, a map output lost before or while they
wait re-blocks them and is rebuilt, and the results still equal the plain-Python reference.
"""

from __future__ import annotations

import operator
import random
from dataclasses import replace
from typing import Any

from engine.graph import StreamingContext
from engine.local import LOCAL, LocalRunner
from engine.plan import Plan
from engine.reference import ReferenceRunner
from engine.scheduler import BatchCompleted, LaunchTask, Scheduler
from engine.sinks import LocalSinks
from engine.testing import assert_batches_equal

MAPS = 4  # input partitions: map tasks of the first keyed operator (node 2)
REDUCES = 3


def _plan() -> Plan:
    ssc = StreamingContext(1.0, num_partitions=REDUCES)
    pairs = ssc.kafka_stream("t").map(lambda x: (x, 1))
    pairs.reduce_by_key(operator.add).running_reduce(operator.add).foreach_batch(lambda t, r: None)
    return Plan(ssc.nodes, {0: MAPS})


def _sched() -> Scheduler:
    s = Scheduler(_plan(), first=0)
    s.add_worker("a", 8)
    s.add_worker("b", 8)
    s.add_batch(0, now=0.0)
    for p in range(MAPS):  # every input block on both workers (receiver and replica)
        s.block_added(f"in/0/0/{p}", "a" if p % 2 else "b", 100)
        s.block_added(f"in/0/0/{p}", "b" if p % 2 else "a", 100)
    return s


def _launched(out: list[Any]) -> dict[str, LaunchTask]:
    return {i.spec.id: i for i in out if isinstance(i, LaunchTask)}


def _finish(s: Scheduler, ins: LaunchTask, now: float = 1.0) -> list[Any]:
    if ins.spec.kind == "output":
        assert s.request_commit(ins.spec.id, ins.attempt) == "granted"
    return s.task_finished(ins.spec.id, ins.attempt, ins.worker, now, 10)


def _reduces(launched: dict[str, LaunchTask]) -> set[str]:
    return {x for x in launched if x.startswith("rd/2/")}


def test_reduces_start_when_the_whole_map_stage_is_in() -> None:
    s = _sched()
    maps = _launched(s.tick(0.0))
    assert set(maps) == {f"sh/2/0/0/{m}" for m in range(MAPS)}
    for m in range(MAPS - 1):
        _finish(s, maps[f"sh/2/0/0/{m}"])
        assert not _reduces(_launched(s.tick(1.0)))  # one map output still missing
    _finish(s, maps[f"sh/2/0/0/{MAPS - 1}"])
    assert _reduces(_launched(s.tick(1.0))) == {f"rd/2/0/{p}" for p in range(REDUCES)}


def test_a_map_output_lost_while_the_reduces_wait_is_rebuilt_first() -> None:
    s = _sched()
    maps = _launched(s.tick(0.0))
    for m in range(MAPS - 1):
        _finish(s, maps[f"sh/2/0/0/{m}"])
    assert not _reduces(_launched(s.tick(1.0)))  # the reduces are parked on the stage
    lost = maps["sh/2/0/0/0"]
    s.block_lost(lost.spec.id, lost.worker)  # a finished map output is gone
    _finish(s, maps[f"sh/2/0/0/{MAPS - 1}"])
    out = _launched(s.tick(2.0))
    # the count of the stage is short by the lost output: it is re-run, the reduces wait
    assert set(out) == {"sh/2/0/0/0"}
    _finish(s, out["sh/2/0/0/0"], 3.0)
    assert _reduces(_launched(s.tick(3.0))) == {f"rd/2/0/{p}" for p in range(REDUCES)}


def test_losing_the_worker_of_finished_map_outputs_reblocks_the_reduces() -> None:
    s = _sched()
    maps = _launched(s.tick(0.0))
    for ins in maps.values():
        _finish(s, ins)
    gone = maps["sh/2/0/0/0"].worker
    on_gone = {x for x, ins in maps.items() if ins.worker == gone}
    s.remove_worker(gone)
    out = _launched(s.tick(2.0))
    assert set(out) == on_gone  # re-run on the other worker, no reduce yet
    assert all(ins.worker != gone for ins in out.values())
    for ins in out.values():
        _finish(s, ins, 3.0)
    assert _reduces(_launched(s.tick(3.0))) == {f"rd/2/0/{p}" for p in range(REDUCES)}


def test_a_reduce_that_finds_a_map_output_missing_has_it_rebuilt() -> None:
    s = _sched()
    for ins in _launched(s.tick(0.0)).values():
        _finish(s, ins)
    reduces = _launched(s.tick(1.0))
    r = reduces["rd/2/0/1"]
    holder = next(iter(s.holders("sh/2/0/0/2")))
    s.task_failed(r.spec.id, r.attempt, r.worker, missing="sh/2/0/0/2", gone_from=[holder])
    out = _launched(s.tick(2.0))
    assert set(out) == {"sh/2/0/0/2"}
    _finish(s, out["sh/2/0/0/2"], 3.0)
    again = _launched(s.tick(3.0))
    assert "rd/2/0/1" in again


def test_a_batch_completes_after_losses_at_every_stage() -> None:
    s = _sched()
    rng = random.Random(7)
    done = False
    for _round in range(100):
        out = s.tick(float(_round))
        done = done or BatchCompleted(0) in out
        launched = [i for i in out if isinstance(i, LaunchTask)]
        if not launched and done:
            break
        for ins in launched:
            done = BatchCompleted(0) in _finish(s, ins, float(_round)) or done
            if ins.spec.kind == "map" and rng.random() < 0.3 and not done:
                s.block_lost(ins.spec.id, ins.worker)
    assert done


class _LosingRunner(LocalRunner):
    """Loses each shuffle map output once, right after it is reported."""

    lost: set[str]

    def _finish(self, ins: LaunchTask, res: object) -> None:
        super()._finish(ins, res)  # type: ignore[arg-type]
        sid = ins.spec.id
        if ins.spec.kind == "map" and sid not in self.lost:
            self.lost.add(sid)
            self.store.free([sid])
            self.scheduler.block_lost(sid, LOCAL)


def test_results_equal_the_reference_when_every_map_output_is_lost_once() -> None:
    batches = [[("a", 1), ("b", 2), ("a", 3)], [("c", 1)], [("a", 5), ("b", 1), ("d", 2)]]

    def build(ssc: StreamingContext, collected: list[Any]) -> None:
        src = ssc.queue_stream(batches)
        counts = src.reduce_by_key(operator.add).running_reduce(operator.add)
        counts.foreach_batch(lambda t, recs: collected.append(list(recs)))

    got: list[Any] = []
    ssc = StreamingContext(1.0, num_partitions=3)
    build(ssc, got)
    runner = _LosingRunner(ssc, sinks=LocalSinks())
    runner.lost = set()
    runner.run(len(batches))
    assert runner.lost  # the losses happened
    ref_ssc = StreamingContext(1.0, num_partitions=1)
    build(ref_ssc, [])
    ref = ReferenceRunner(ref_ssc)
    ref.run(len(batches))
    (out_id,) = ref.outputs
    want = [recs for _, recs in ref.outputs[out_id]]
    assert len(want) == len(batches)
    assert_batches_equal(got, want)


def test_a_reduce_reads_whole_map_stages_and_its_previous_state() -> None:
    s = _sched()
    specs = {t.id: t for t in s.plan.tasks_for_batch(1, 0)}
    reduce_ = specs["rd/3/1/2"]
    split = s._split_of(reduce_)
    assert split is not None
    assert [(g, n) for g, n, _ in split.groups] == [("sh/3/0/1", REDUCES)]
    assert [reduce_.inputs[i][0] for i in split.others] == ["rd/3/0/2"]  # previous state
    # inputs not listed as a whole stage in order are waited on block by block
    shuffled = replace(reduce_, inputs=(reduce_.inputs[1], reduce_.inputs[0]))
    assert s._split_of(replace(shuffled, node=99)) is None
    assert s._split_of(specs["sh/2/0/1/0"]) is None  # a map task reads an input block


def test_slot_index_picks_the_most_free_then_the_first_by_name() -> None:
    rng = random.Random(3)
    idx = Scheduler(_plan(), first=0)._free
    names = [f"w{i:02d}" for i in range(30)]
    for w in names:
        idx.add(w, rng.choice([1, 2, 4]))
    for _ in range(3000):
        w = rng.choice(names)
        op = rng.random()
        if w not in idx.slots:
            idx.add(w, rng.choice([1, 2, 4]))
        elif op < 0.45 and idx.get(w) > 0:
            idx.take(w)
        elif op < 0.9:
            idx.release(w)
        elif op < 0.95:
            idx.remove(w)
        elif op < 0.97:  # stragglers set apart, as the scheduler's suspects
            idx.avoid(frozenset(rng.sample(names, rng.choice([0, 1, 5]))))
        ex = set(rng.sample(names, 2))
        free = {x: idx.get(x) for x in idx.slots if x not in ex and idx.get(x) > 0}
        avoided = idx._avoid
        preferred = {x: n for x, n in free.items() if x not in avoided}
        want = min(preferred or free, key=lambda x: (-free[x], x)) if free else None
        assert idx.best(ex) == want
        want = min(preferred, key=lambda x: (-free[x], x)) if preferred else None
        assert idx.best(ex, avoided=False) == want


def test_an_output_waiting_for_its_busy_worker_follows_its_partition_when_it_moves() -> None:
    s = _sched()
    out = s.tasks["out/4/0/0"].spec
    home = s._output_home(out)
    for _ in range(s.slots[home]):
        s._free.take(home)  # the output's pinned worker is busy (with other work)
    launched: dict[str, LaunchTask] = {}
    for _round in range(10):
        launched = _launched(s.tick(float(_round)))
        if not launched:
            break
        for ins in launched.values():
            _finish(s, ins, float(_round))
    assert s.tasks[out.id].status == "pending"  # ready, waiting for a slot on its home
    s._move_output_home(out, home)  # as speculation does when the home straggles
    launched = _launched(s.tick(20.0))
    assert set(launched) == {out.id}
    assert launched[out.id].worker != home
