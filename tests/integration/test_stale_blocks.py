"""Stale input-block copies are never read.

A worker paused in the middle of a seal can leave a copy of an input block (locally and on
its replica peer) cut from an offset range the coordinator never logged; the coordinator
then logs that batch's range afresh. Tasks check every input block against the logged range:
a stale local copy is dropped, a stale remote one skipped, and with no good copy the task
fails naming the stale holders, so the block is re-read from Kafka.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.codec import encode_input_block, input_block_range
from engine.executor import BlockMissing
from ops.config import load_settings
from ops.worker import Worker
from state.blockstore import BlockStore

pytestmark = pytest.mark.integration

APP = """
from engine import StreamingContext

def build(ssc: StreamingContext) -> None:
    ssc.kafka_stream("stale-in").count().to_kafka("stale-out")
"""

BID = "in/0/9/0"


def block(lo: int, hi: int) -> bytes:
    return encode_input_block("stale-in", 0, lo, hi, [b"v%d" % i for i in range(lo, hi)])


@pytest.fixture
def workers(
    tmp_path: Path, kafka_bootstrap: str, redis_url: str, app_id: str
) -> Iterator[list[Worker]]:
    app = tmp_path / "app.py"
    app.write_text(APP)
    settings = load_settings(
        kafka_bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        secret="stale-block-test-secret",
        coordinator="127.0.0.1:9",
        rpc_port=0,
    )
    made = []
    for _ in range(2):
        w = Worker(settings, str(app), app_id)
        w.server.start()
        host, port = w.server.address
        w.id = f"{host}:{port}"
        w.tasks.plan = object()  # type: ignore[assignment]  # only input blocks are fetched here
        made.append(w)
    yield made
    for w in made:
        w.stopping.set()
        w.server.stop()
        w.coordinator.close()
        w.peer_pool.close()


def test_input_block_range_reads_the_header_only() -> None:
    assert input_block_range(block(5, 9)) == (5, 9)


def test_store_replaces_only_when_asked() -> None:
    store = BlockStore()
    store.put(BID, block(0, 5))
    store.put(BID, block(0, 3))
    assert input_block_range(store.get(BID)) == (0, 5)  # idempotent put keeps the first
    store.put(BID, block(0, 3), replace=True)
    assert input_block_range(store.get(BID)) == (0, 3)
    assert store.nbytes == len(block(0, 3))


def test_stale_local_copy_is_dropped_and_a_good_peer_copy_used(workers: list[Worker]) -> None:
    a, b = workers
    a.store.put(BID, block(0, 5))  # cut by a seal whose report never reached the coordinator
    b.store.put(BID, block(0, 3))  # the logged range
    fetch = a.tasks.fetcher({BID: [a.id, b.id]}, {BID: [0, 3]})
    assert input_block_range(fetch(BID, -1)) == (0, 3)
    assert not a.store.has(BID)


def test_no_good_copy_fails_naming_the_stale_holders(workers: list[Worker]) -> None:
    a, b = workers
    a.store.put(BID, block(0, 5))
    b.store.put(BID, block(0, 5))
    fetch = a.tasks.fetcher({BID: [a.id, b.id]}, {BID: [0, 0]})
    with pytest.raises(BlockMissing) as e:
        fetch(BID, -1)
    assert e.value.gone_from == [b.id]
    assert not a.store.has(BID)


def test_without_a_logged_range_any_copy_is_read(workers: list[Worker]) -> None:
    a, _ = workers
    a.store.put(BID, block(0, 5))
    assert input_block_range(a.tasks.fetcher({}, {})(BID, -1)) == (0, 5)
