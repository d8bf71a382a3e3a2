"""The wire protocol: every message survives msgpack and its own decoding."""

from __future__ import annotations

from typing import Any

import pytest

from engine.codec import pack, unpack
from engine.plan import ShuffleInputs, TaskSpec
from engine.scheduler import ShuffleLocations, StageHolders
from ops import protocol as wire
from state.metalog import OffsetRange

SPEC = TaskSpec("rd/3/7/1", "result", 3, 0, 7, 1, (("in/0/7/0", -1), ("sh/2/0/7/1", 1)), "r:3")
#: a reduce as the planner makes it: two map stages of 1,000 outputs and its previous state
REDUCE = TaskSpec(
    "rd/3/7/1",
    "result",
    3,
    0,
    7,
    1,
    ShuffleInputs((("sh/3/0/7", 1000), ("sh/3/1/7", 1000)), 1, (("rd/3/6/1", -1),)),
    "reduce:3",
)

MESSAGES: list[Any] = [
    wire.Register("10.0.0.1:7000", 4, ["in/0/1/0"], 9100),
    wire.RegisterReply(3, 0, {0: [("pv", 0), ("pv", 1)], 2: [("", 0)]}, 1000),
    wire.Heartbeat("w", 10, 2, 99, {("pv", 0): 5}),
    wire.TaskDone("rd/3/7/1", 1, "w", 128, 10, 1, 0.25),
    wire.TaskFailed("t", 0, "w", "BlockMissing: x", wire.FailureKind.MISSING_INPUT, "in/0/1/0"),
    wire.TaskFailed("t", 2, "w", "UserFunctionError: boom", wire.FailureKind.APP_FAILED),
    wire.RequestCommit("out/4/7/0", 0, "w"),
    wire.Checkpointed(3, 1, 9, 4096, 0.5),
    wire.Status(),
    wire.Query("app", "counts", ["a", "42"], "", None),
    wire.Query("app", "counts", prefix="/p", limit=5),
    wire.Seal(7, 100),
    wire.Seal(8),
    wire.BlockReport("in/0/7/1", OffsetRange("pv", 1, 10, 20, 10), 512, ["a", "b"]),
    wire.Assign([wire.PartitionAssignment(0, 1, "pv", 1, 42)], ["b", "c"], 500),
    wire.Assign([], []),
    wire.Launch(SPEC, 2, {"in/0/7/0": ["a"]}, {"in/0/7/0": (10, 20)}, 7000),
    wire.Launch(REDUCE, 0, {"sh/3/0/7/0": ["a"]}, {}, 7000),
    wire.Launch(
        REDUCE,
        1,
        ShuffleLocations(
            {"sh/3/0/7": StageHolders(("a", "b"), [[0], [1, 0], []])},
            {"rd/3/6/1": ["b", "@checkpoint"]},
        ),
        {},
        7000,
    ),
    wire.ReadInput("in/0/7/1", OffsetRange("pv", 1, 10, 20, 10)),
    wire.ReplicateTo("in/0/7/1", "b"),
    wire.Free(["in/0/1/0", "rd/3/1/0"]),
    wire.Cancel("rd/3/7/1", 1),
    wire.Finish(5_000_000, 42),
    wire.AwaitLoad(1.0),
    wire.TableLoad("users", 0, 300, 900),
    wire.Assign([wire.PartitionAssignment(1, 0, "users", 0, 0, None, 900)], ["a"]),
    wire.Assign([wire.PartitionAssignment(0, 2, "pv", 2, 40, 90)], ["a"]),
    wire.QueryPartition(3, 7, 1, {"rd/3/7/1": ["a", "@checkpoint"]}, ["a"], "", 100),
    wire.Fetch("sh/2/0/7/1", 3),
    wire.Replicate("in/0/7/1", b"\x00\x01"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_through_msgpack(msg: Any) -> None:
    assert type(msg).from_wire(unpack(pack(msg.to_wire()))) == msg


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_messages_are_frozen_with_slots(msg: Any) -> None:
    assert not hasattr(msg, "__dict__")
    assert type(msg).__dataclass_params__.frozen


def test_every_message_has_its_method() -> None:
    calls = [m for m in MESSAGES if type(m) in wire.METHODS]
    assert {wire.method_of(m) for m in calls} == set(wire.METHODS.values())
    assert {
        "seal",
        "launch",
        "assign",
        "free",
        "cancel",
        "read_input",
        "replicate_to",
        "finish",
        "query_part",
        "await_load",
    } == (wire.COORDINATOR_CALLS)


def test_answers_keep_their_wire_strings() -> None:
    assert [a.value for a in wire.CommitAnswer] == ["granted", "denied", "wait"]
    assert wire.CommitAnswer("wait") is wire.CommitAnswer.WAIT
    assert wire.HeartbeatAnswer("unknown") is wire.HeartbeatAnswer.UNKNOWN


def test_offset_ranges_are_named_and_stored_as_lists() -> None:
    r = OffsetRange("pv", 1, 10, 20, 9)
    assert (r.topic, r.partition, r.start, r.until, r.records) == ("pv", 1, 10, 20, 9)
    assert list(unpack(pack(r))) == ["pv", 1, 10, 20, 9]  # the metadata log's stored format


def test_a_failure_without_a_kind_is_an_error() -> None:
    m = wire.TaskFailed.from_wire({"task": "t", "attempt": 0, "worker": "w", "error": "x"})
    assert m.kind is wire.FailureKind.ERROR and m.gone_from == []


def test_a_reduce_travels_as_its_map_stages_not_its_map_outputs() -> None:
    packed = pack(wire.task_spec_to_wire(REDUCE))
    assert len(packed) < 100  # 2,001 input pairs would be over 20 kB
    back = wire.task_spec_from_wire(unpack(packed))
    assert back == REDUCE
    assert isinstance(back.inputs, ShuffleInputs)
    assert list(back.inputs) == list(REDUCE.inputs)
    assert back.inputs[1000] == ("sh/3/1/7/0", 1)
    assert back.inputs[-1] == ("rd/3/6/1", -1)


def test_a_reduce_launch_sends_each_stage_s_holders_once_as_indexes() -> None:
    hosts = tuple(f"10.0.{i // 250}.{i % 250}:7000" for i in range(1000))
    # 1,000 workers with 4 input partitions each: 4,000 map outputs per stage
    stages = {
        "sh/3/0/7": StageHolders(hosts, [[m % 1000] for m in range(4000)]),
        "sh/3/1/7": StageHolders(hosts, [[m % 1000, (m + 1) % 1000] for m in range(4000)]),
    }
    locs = ShuffleLocations(stages, {"rd/3/6/1": ["@checkpoint"]})
    packed = pack(wire.Launch(REDUCE, 0, locs, {}, 7000).to_wire())
    as_dict = pack(wire.Launch(REDUCE, 0, dict(locs), {}, 7000).to_wire())
    assert len(packed) < len(as_dict) / 3  # 62 kB vs 350 kB
    back = wire.Launch.from_wire(unpack(packed)).locations
    assert isinstance(back, ShuffleLocations)
    assert dict(back) == dict(locs) and len(back) == 8001
    assert back["sh/3/1/7/3999"] == [hosts[999], hosts[0]]
    assert back.get("sh/3/0/7/4000") is None and back.get("sh/9/0/7/0", []) == []
    assert back["rd/3/6/1"] == ["@checkpoint"]
    assert "sh/3/0/7/5" in back and "sh/3/0/7/x" not in back
