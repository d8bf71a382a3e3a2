"""The scheduler state machine: events in, instructions out, no services and no clock."""

from __future__ import annotations

import operator

from engine.graph import StreamingContext
from engine.plan import Plan, block_batch
from engine.scheduler import (
    CHECKPOINT,
    BatchCompleted,
    FreeBlocks,
    LaunchTask,
    ReadInput,
    Replicate,
    Scheduler,
)


def _plan(window: bool = False) -> Plan:
    ssc = StreamingContext(1.0, num_partitions=2)
    src = ssc.kafka_stream("t")
    pairs = src.map(lambda x: (x, 1))
    if window:
        pairs.reduce_by_key_and_window(operator.add, operator.sub, 3, 1).foreach_batch(
            lambda t, r: None
        )
    else:
        pairs.reduce_by_key(operator.add).running_reduce(operator.add).foreach_batch(
            lambda t, r: None
        )
    return Plan(ssc.nodes, {0: 2})


def _seal(s: Scheduler, b: int, holders: dict[int, list[str]]) -> None:
    s.add_batch(b, now=float(b))
    for p, ws in holders.items():
        for w in ws:
            s.block_added(f"in/0/{b}/{p}", w, 100)


def _drain(s: Scheduler, now: float = 100.0, fail: set[str] | None = None) -> list:
    """Run every launched task to completion (outputs commit at once); return all events."""
    seen: list = []
    for _ in range(200):
        out = s.tick(now)
        seen.extend(out)
        for i in out:
            if isinstance(i, ReadInput):  # the shell re-reads it from Kafka
                s.block_added(i.block_id, sorted(s.slots)[0], 10)
        launches = [i for i in out if isinstance(i, LaunchTask)]
        if not launches and not any(isinstance(i, ReadInput) for i in out):
            return seen
        for ins in launches:
            if fail and ins.worker in fail:
                continue
            if ins.spec.kind == "output":
                assert s.request_commit(ins.spec.id, ins.attempt) == "granted"
            seen.extend(s.task_finished(ins.spec.id, ins.attempt, ins.worker, now + 0.01, 10))
    raise AssertionError("scheduler did not settle")


def test_a_batch_runs_and_completes_and_frees_its_blocks() -> None:
    s = Scheduler(_plan(), first=0)
    s.add_worker("a", 2)
    s.add_worker("b", 2)
    _seal(s, 0, {0: ["a", "b"], 1: ["b", "a"]})
    events = _drain(s)
    assert BatchCompleted(0) in events
    freed = {bid for e in events if isinstance(e, FreeBlocks) for bid in e.block_ids}
    assert "in/0/0/0" in freed and any(b.startswith("sh/") for b in freed)
    # the state partitions are kept: batch 1 reads them
    assert any(s.holders(f"rd/3/0/{p}") for p in range(2))


def test_locality_prefers_the_holder_of_the_input() -> None:
    s = Scheduler(_plan(), first=0)
    s.add_worker("a", 4)
    s.add_worker("b", 4)
    _seal(s, 0, {0: ["a"], 1: ["b"]})
    launches = [i for i in s.tick(0.0) if isinstance(i, LaunchTask)]
    where = {i.spec.id: i.worker for i in launches}
    assert where["sh/2/0/0/0"] == "a"
    assert where["sh/2/0/0/1"] == "b"


def test_lost_state_is_rebuilt_from_the_checkpoint_and_kafka() -> None:
    s = Scheduler(_plan(), first=0)
    s.add_worker("a", 4)
    s.add_worker("b", 4)
    for b in range(4):
        _seal(s, b, {0: ["a", "b"], 1: ["b", "a"]})
        _drain(s)
    s.set_checkpoint(3, 0, 1)
    s.set_checkpoint(3, 1, 1)
    holders = {p: s.holders(f"rd/3/3/{p}") for p in range(2)}
    lost = next(iter(holders[0]))
    s.remove_worker(lost)
    _seal(s, 4, {0: [w for w in ("a", "b") if w != lost], 1: [w for w in ("a", "b") if w != lost]})
    assert CHECKPOINT in s.holders("rd/3/1/0")
    first_tick = s.tick(50.0)
    reads = {i.block_id for i in first_tick if isinstance(i, ReadInput)}
    # the batches since the checkpoint are all asked for at once (recovered in parallel)
    assert {"in/0/2/0", "in/0/2/1", "in/0/3/0", "in/0/3/1"} == reads
    assert "in/0/1/0" not in reads  # the checkpoint at batch 1 stops the lineage
    for i in first_tick:
        if isinstance(i, LaunchTask):
            s.task_finished(i.spec.id, i.attempt, i.worker, 50.1, 1)
    for bid in reads:
        s.block_added(bid, next(iter(s.slots)), 10)
    events = _drain(s, 60.0)
    assert BatchCompleted(4) in events
    assert s.stats.recomputed > 0


def _four_batches_checkpointed_at_1(s: Scheduler, holders: dict[int, list[str]]) -> set[str]:
    """Run batches 0-3, both state partitions checkpointed after batch 1; the blocks freed."""
    freed: set[str] = set()
    for b in range(4):
        _seal(s, b, holders)
        freed |= {bid for e in _drain(s) if isinstance(e, FreeBlocks) for bid in e.block_ids}
        if b == 1:
            s.set_checkpoint(3, 0, 1)
            s.set_checkpoint(3, 1, 1)
    return freed


def test_inputs_since_the_checkpoint_are_kept_and_rebuild_lost_state_without_kafka() -> None:
    s = Scheduler(_plan(), first=0, retain_inputs=10)
    s.add_worker("a", 4)
    s.add_worker("b", 4)
    freed = _four_batches_checkpointed_at_1(s, {0: ["a", "b"], 1: ["b", "a"]})
    # batches 0 and 1 are covered by the checkpoint: their inputs went; 2 and 3 stayed
    assert {"in/0/0/0", "in/0/1/1"} <= freed
    assert not {bid for bid in freed if bid.startswith(("in/0/2/", "in/0/3/"))}
    lost = next(iter(s.holders("rd/3/3/0")))
    s.remove_worker(lost)
    _seal(s, 4, {0: [w for w in ("a", "b") if w != lost], 1: [w for w in ("a", "b") if w != lost]})
    events = _drain(s, 60.0)
    assert not [i for i in events if isinstance(i, ReadInput)]  # nothing re-read from Kafka
    assert BatchCompleted(4) in events
    assert s.stats.recomputed > 0


def test_input_retention_is_bounded_without_checkpoints() -> None:
    s = Scheduler(_plan(), first=0, retain_inputs=2)
    s.add_worker("a", 4)
    freed: set[str] = set()
    for b in range(6):
        _seal(s, b, {0: ["a"], 1: ["a"]})
        freed |= {bid for e in _drain(s) if isinstance(e, FreeBlocks) for bid in e.block_ids}
    assert {f"in/0/{b}/0" for b in range(4)} <= freed
    assert "in/0/4/0" not in freed and "in/0/5/0" not in freed


def test_outputs_commit_in_batch_order_and_once() -> None:
    s = Scheduler(_plan(), first=0)
    s.add_worker("a", 8)
    _seal(s, 0, {0: ["a"], 1: ["a"]})
    _seal(s, 1, {0: ["a"], 1: ["a"]})
    launched = []
    for _ in range(10):
        for i in s.tick(0.0):
            if isinstance(i, LaunchTask):
                launched.append(i)
                if i.spec.kind != "output":
                    s.task_finished(i.spec.id, i.attempt, i.worker, 0.1, 1)
    outs = [i for i in launched if i.spec.kind == "output"]
    assert [o.spec.batch for o in outs] == [0]  # batch 1's output waits for batch 0's
    assert s.request_commit(outs[0].spec.id, outs[0].attempt) == "granted"
    assert s.request_commit(outs[0].spec.id, outs[0].attempt + 7) == "denied"


def _fast_and_slow() -> tuple[Scheduler, LaunchTask, LaunchTask]:
    """Batch 0's two map tasks launched, one on "fast", one on "slow" (both hold both inputs)."""
    s = Scheduler(_plan(), first=0, speculation=True, multiplier=1.4, quantile=0.5)
    s.add_worker("fast", 4)
    s.add_worker("slow", 4)
    s.add_batch(0, 0.0)
    for p in range(2):
        s.block_added(f"in/0/0/{p}", "fast", 1)
        s.block_added(f"in/0/0/{p}", "slow", 1)
    first = [i for i in s.tick(0.0) if isinstance(i, LaunchTask)]
    maps = [i for i in first if i.spec.kind == "map"]
    assert len(maps) == 2
    # equal locality: the second task goes to the worker with more free slots
    fast = next(i for i in maps if i.worker == "fast")
    slow = next(i for i in maps if i.worker == "slow")
    return s, fast, slow


def test_a_straggler_gets_a_speculative_copy_that_can_win() -> None:
    s, fast, slow = _fast_and_slow()
    s.task_finished(fast.spec.id, fast.attempt, "fast", 0.1, 1)
    spec_launch = [i for i in s.tick(1.0) if isinstance(i, LaunchTask) and i.speculative]
    assert [i.spec.id for i in spec_launch] == [slow.spec.id]
    assert spec_launch[0].worker == "fast"
    s.task_finished(slow.spec.id, spec_launch[0].attempt, "fast", 1.2, 1)
    assert s.stats.speculative_launched == 1 and s.stats.speculative_won == 1
    # the original attempt finishing later is discarded and its block freed
    late = s.task_finished(slow.spec.id, slow.attempt, "slow", 3.0, 1)
    assert late == [FreeBlocks("slow", (slow.spec.id,))]


def test_a_worker_caught_straggling_gets_no_new_tasks_while_others_are_free() -> None:
    s, fast, slow = _fast_and_slow()
    s.task_finished(fast.spec.id, fast.attempt, "fast", 0.1, 1)
    copy = next(i for i in s.tick(1.0) if isinstance(i, LaunchTask) and i.speculative)
    assert "slow" in s.suspects
    s.task_finished(slow.spec.id, copy.attempt, "fast", 1.1, 1)
    # the next batch's map tasks: both inputs are also held by "slow", yet both go to "fast"
    s.add_batch(1, 1.2)
    for p in range(2):
        s.block_added(f"in/0/1/{p}", "slow", 1)
        s.block_added(f"in/0/1/{p}", "fast", 1)
    nxt = [i for i in s.tick(1.2) if isinstance(i, LaunchTask) and i.spec.batch == 1]
    assert nxt and {i.worker for i in nxt} == {"fast"}
    # the suspicion expires: "slow" is used again
    s.add_batch(2, 10.0)
    for p in range(2):
        s.block_added(f"in/0/2/{p}", "slow", 1)
    later = [i for i in s.tick(10.0) if isinstance(i, LaunchTask) and i.spec.batch == 2]
    assert {i.worker for i in later} == {"slow"}
    assert "slow" not in s.suspects


def test_losing_a_worker_rereplicates_its_inputs() -> None:
    s = Scheduler(_plan(), first=0)
    for w in ("a", "b", "c"):
        s.add_worker(w, 2)
    s.add_batch(0, 0.0)
    s.block_added("in/0/0/0", "a", 1)
    s.block_added("in/0/0/0", "b", 1)
    out = s.remove_worker("a")
    assert out == [Replicate("in/0/0/0", "b", "c")]


def test_failed_tasks_back_off() -> None:
    s = Scheduler(_plan(), first=0)
    s.add_worker("a", 4)
    _seal(s, 0, {0: ["a"], 1: ["a"]})
    ins = next(i for i in s.tick(0.0) if isinstance(i, LaunchTask))
    s.task_failed(ins.spec.id, ins.attempt, "a", now=0.0)
    again = [i.spec.id for i in s.tick(0.01) if isinstance(i, LaunchTask)]
    assert ins.spec.id not in again
    later = [i.spec.id for i in s.tick(1.0) if isinstance(i, LaunchTask)]
    assert ins.spec.id in later


def test_output_partitions_are_pinned_to_one_worker() -> None:
    s = Scheduler(_plan(), first=0)
    s.add_worker("a", 4)
    s.add_worker("b", 4)
    homes = set()
    for b in range(3):
        _seal(s, b, {0: ["a", "b"], 1: ["a", "b"]})
        for e in _drain(s, float(b)):
            if isinstance(e, LaunchTask) and e.spec.kind == "output":
                homes.add(e.worker)
    assert len(homes) == 1


def test_a_straggling_output_moves_its_partition_to_another_worker() -> None:
    ssc = StreamingContext(1.0, num_partitions=2)
    counts = ssc.kafka_stream("t").map(lambda x: (x, 1)).reduce_by_key(operator.add)
    counts.to_kafka("out")  # one output partition per reduce partition
    s = Scheduler(Plan(ssc.nodes, {0: 2}), first=0, speculation=True, quantile=0.5)
    s.add_worker("a", 8)
    s.add_worker("b", 8)
    _seal(s, 0, {0: ["a", "b"], 1: ["a", "b"]})
    outs: list[LaunchTask] = []
    for _ in range(10):
        for i in s.tick(0.0):
            if isinstance(i, LaunchTask):
                if i.spec.kind == "output":
                    outs.append(i)
                else:
                    s.task_finished(i.spec.id, i.attempt, i.worker, 0.01, 1)
    # one output partition finishes fast, the other one straggles on its home worker
    fast, slow = outs[0], outs[1]
    assert s.request_commit(fast.spec.id, fast.attempt) == "granted"
    s.task_finished(fast.spec.id, fast.attempt, fast.worker, 0.02, 0)
    home = s.output_owner[(slow.spec.node, slow.spec.part)]
    s.tick(5.0)
    moved = s.output_owner[(slow.spec.node, slow.spec.part)]
    assert moved != home  # later batches of that partition go elsewhere, no copy now
    assert not [i for i in s.tick(5.1) if isinstance(i, LaunchTask) and i.speculative]


def test_a_block_found_stale_everywhere_is_reread() -> None:
    """A task that found no good copy names the stale holders; the block is re-read."""
    s = Scheduler(_plan(), 0)
    for w in ("a", "b", "c"):
        s.add_worker(w, 2)
    _seal(s, 0, {0: ["a", "b"], 1: ["a", "b"]})
    out = s.tick(0.0)
    task = next(i for i in out if isinstance(i, LaunchTask) and "in/0/0/0" in dict(i.spec.inputs))
    s.task_failed(
        task.spec.id, task.attempt, task.worker, "in/0/0/0", now=0.1, gone_from=["a", "b"]
    )
    assert s.holders("in/0/0/0") == set()
    reread = [i for i in s.tick(0.2) if isinstance(i, ReadInput)]
    assert [i.block_id for i in reread] == ["in/0/0/0"]
    assert s.holders("in/0/0/1") == {"a", "b"}


def test_launch_locations_follow_block_changes() -> None:
    """The holders sent with a reduce (shared by every reduce of the batch) stay current."""
    ssc = StreamingContext(1.0, num_partitions=2)
    ssc.kafka_stream("t").map(lambda x: (x, 1)).reduce_by_key(operator.add).foreach_batch(
        lambda t, r: None
    )
    plan = Plan(ssc.nodes, {0: 40})  # 40 map outputs per reduce: past the locality cut-off
    s = Scheduler(plan, 0)
    s.add_worker("a", 64)
    s.add_worker("b", 64)
    specs = s.add_batch(0, 0.0)
    reduces = [x for x in specs if x.kind == "result"]
    maps = [x for x in specs if x.kind == "map"]
    for m in maps:
        s.block_added(m.id, "a", 1)
    first = s.locations_of(reduces[0])
    assert first == s.locations_of(reduces[1])
    assert set(first) == {m.id for m in maps} and all(v == ["a"] for v in first.values())
    s.block_added(maps[0].id, "b", 1)
    assert sorted(s.locations_of(reduces[1])[maps[0].id]) == ["a", "b"]
    s.remove_worker("a")
    assert s.locations_of(reduces[0])[maps[0].id] == ["b"]
    assert s.locations_of(reduces[0])[maps[1].id] == []


def test_a_batch_planned_ahead_is_taken_when_it_is_cut() -> None:
    plan = _plan()
    s = Scheduler(plan, first=0)
    s.add_worker("a", 4)
    s.prepare(1)
    ahead = s._prepared
    assert ahead is not None and ahead.batch == 1
    calls: list[int] = []
    listed = plan.tasks_for_batch

    def counted(b: int, first: int) -> list:
        calls.append(b)
        return listed(b, first)

    plan.tasks_for_batch = counted  # type: ignore[method-assign]
    _seal(s, 0, {0: ["a"], 1: ["a"]})  # not the batch planned ahead: planned now
    assert calls == [0]
    assert s._prepared == ahead
    specs = s.add_batch(1, now=1.0)
    assert calls == [0]  # batch 1 was not planned again
    assert specs is ahead.specs and s._prepared is None
    assert all(s.tasks[t.id] is ahead.tasks[t.id] for t in specs)
    assert s.add_batch(2, now=2.0) == listed(2, 0) and calls == [0, 2]


def test_lost_state_is_rebuilt_from_the_blocks_on_its_way_that_survived() -> None:
    """Only the lost worker's part of a state partition's lineage runs again.

    The map outputs and reduced partitions on the way from the inputs to the state are
    kept until the checkpoint covers them (as the inputs are): rebuilding a lost state
    partition re-runs the tasks whose blocks were on the lost worker alone, not every
    map task of every batch since the checkpoint.
    """
    s = Scheduler(_plan(), first=0, retain_inputs=10)
    for w in ("a", "b", "c"):
        s.add_worker(w, 2)
    freed = _four_batches_checkpointed_at_1(s, {0: ["a", "b"], 1: ["b", "c"]})
    # batches 0 and 1 are covered by the checkpoint: their blocks went; of 2 and 3, the map
    # outputs and reduced partitions on the way to the state stayed
    assert {"sh/2/0/0/0", "rd/2/1/1", "sh/3/0/1/0"} <= freed
    on_the_way = {bid for bid in freed if bid.startswith(("sh/", "rd/2/"))}
    assert not {bid for bid in on_the_way if block_batch(bid) >= 2}
    lost = next(iter(s.holders("rd/3/3/0")))
    held = {bid: set(ws) for bid, ws in s.locations.items()}
    only_there = {bid for bid, ws in held.items() if ws == {lost}}
    s.remove_worker(lost)
    live = [w for w in ("a", "b", "c") if w != lost]
    _seal(s, 4, {0: live, 1: live})
    events = _drain(s, 60.0)
    assert BatchCompleted(4) in events
    assert not [i for i in events if isinstance(i, ReadInput)]
    rerun = {i.spec.id for i in events if isinstance(i, LaunchTask) and i.spec.batch < 4}
    assert rerun, "the lost state partition was rebuilt"
    assert "rd/3/3/0" in rerun
    # nothing that survived elsewhere ran again: only the lost worker's blocks, and the
    # state partition's chain since the checkpoint (its older batches were freed)
    assert rerun <= only_there | {"rd/3/2/0", "rd/3/3/0"}, rerun - only_there
    assert not any(bid.startswith("sh/") and bid in held and bid not in only_there for bid in rerun)


def test_a_tick_with_a_limit_hands_out_launches_in_chunks() -> None:
    whole = Scheduler(_plan(), first=0)
    chunked = Scheduler(_plan(), first=0)
    for s in (whole, chunked):
        for w in ("a", "b", "c"):
            s.add_worker(w, 2)
        _seal(s, 0, {0: ["a", "b"], 1: ["b", "c"]})
    at_once = [(i.spec.id, i.worker) for i in whole.tick(0.0) if isinstance(i, LaunchTask)]
    assert len(at_once) == 2  # the two map tasks
    first = [i for i in chunked.tick(0.0, limit=1) if isinstance(i, LaunchTask)]
    assert len(first) == 1
    rest = [i for i in chunked.tick(0.0, limit=1) if isinstance(i, LaunchTask)]
    assert [(i.spec.id, i.worker) for i in first + rest] == at_once
    assert not [i for i in chunked.tick(0.0, limit=1) if isinstance(i, LaunchTask)]


def test_an_unresponsive_worker_s_work_runs_elsewhere_until_it_answers() -> None:
    """A worker that misses a seal is set apart: no launches, its blocks rebuilt
    elsewhere, its running attempts rerun; when it answers, its blocks count again and
    those freed meanwhile are freed on it."""
    s = Scheduler(_plan(), first=0, retain_inputs=10)
    for w in ("a", "b", "c"):
        s.add_worker(w, 2)
    for b in range(2):
        _seal(s, b, {0: ["a", "b"], 1: ["b", "c"]})
        assert BatchCompleted(b) in _drain(s)
    paused = next(iter(s.holders("rd/3/1/0")))
    held = {bid for bid, ws in s.locations.items() if paused in ws}
    _seal(s, 2, {0: ["a", "b"], 1: ["b", "c"]})
    running = [i for i in s.tick(10.0) if isinstance(i, LaunchTask)]
    on_paused = [i for i in running if i.worker == paused]
    s.set_unresponsive(paused)
    assert s.unresponsive() == [paused]
    assert s.set_unresponsive(paused) == []  # once
    for i in running:
        if i.worker != paused:
            s.task_finished(i.spec.id, i.attempt, i.worker, 10.1, 10)
    events = _drain(s, 20.0)
    assert BatchCompleted(2) in events  # without the paused worker
    assert not [i for i in events if isinstance(i, LaunchTask) and i.worker == paused]
    assert not [i for i in events if isinstance(i, ReadInput)]
    # its late reports are stale attempts: their blocks are freed on it
    for i in on_paused:
        late = s.task_finished(i.spec.id, i.attempt, paused, 20.5, 10)
        assert late in ([], [FreeBlocks(paused, (i.spec.id,))])
    back = s.responsive_again(paused)
    assert s.unresponsive() == [] and s.responsive_again(paused) == []
    freed = {bid for e in back if isinstance(e, FreeBlocks) for bid in e.block_ids}
    kept = held - freed
    assert freed and kept  # some went meanwhile (batch 0's), some are still tracked
    assert all(paused in s.holders(bid) for bid in kept)
    assert not {bid for bid in freed if bid in s.locations}
    _seal(s, 3, {0: ["a", "b"], 1: ["b", "c"]})
    events = _drain(s, 30.0)
    assert BatchCompleted(3) in events
    assert any(isinstance(i, LaunchTask) and i.worker == paused for i in events)


def test_running_longer_than_names_the_workers_of_old_attempts() -> None:
    """The liveness probe's candidates: workers with an attempt running past the age."""
    s = Scheduler(_plan(), first=0)
    for w in ("a", "b", "c"):
        s.add_worker(w, 2)
    _seal(s, 0, {0: ["a", "b"], 1: ["b", "c"]})
    assert s.running_longer_than(10.0, 0.25) == set()  # nothing runs yet
    early = [i for i in s.tick(10.0) if isinstance(i, LaunchTask)]
    assert early
    assert s.running_longer_than(10.2, 0.25) == set()
    assert s.running_longer_than(10.3, 0.25) == {i.worker for i in early}
    # a finished attempt no longer counts
    first = early[0]
    s.task_finished(first.spec.id, first.attempt, first.worker, 10.3, 10)
    left = {i.worker for i in early[1:]}
    assert s.running_longer_than(10.3, 0.25) == left
