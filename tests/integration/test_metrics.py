"""``/metrics``, ``/livez`` and ``/readyz`` of the coordinator and every worker during a run.

Workers serve HTTP on a port the OS picks (``DSTREAM_HTTP_PORT=0`` under ``dstream run``)
and do not report it, so the test finds it the way ``ss -ltnp`` does: the listening TCP
sockets (``/proc/net/tcp``) owned by each worker process (``/proc/PID/fd``), minus the
worker's RPC port (its id in ``/api/status``).
"""

from __future__ import annotations

import collections
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from tests.fleetkit import fleet_env, last_values, read_topic, run_fleet, wait_for

N = 5000
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_LISTEN = "0A"


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _samples(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    code, text = _get(port, "/metrics")
    assert code == 200, text
    out: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name].append((s.labels, s.value))
    return out


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        for k in map(int, kids):
            out += [k, *_descendants(k)]
    return out


def _listening_ports(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == _LISTEN and f[9] in inodes:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def _worker_http_ports(fleet_pid: int, status: dict[str, Any], coord_http: int) -> list[int]:
    rpc = {int(w["id"].rsplit(":", 1)[1]) for w in status["workers"]}
    found = []
    for pid in _descendants(fleet_pid):
        ports = _listening_ports(pid)
        if coord_http in ports or not ports & rpc:
            continue  # the coordinator, or not a worker
        found += sorted(ports - rpc)
    return found


def _status(port: int) -> dict[str, Any]:
    code, text = _get(port, "/api/status")
    assert code == 200, text
    return json.loads(text)  # type: ignore[no-any-return]


def test_metrics_add_up_during_a_run(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    inp, out = new_topic(3), new_topic(1)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=N, keys=50, seed=5)
    expected = collections.Counter(
        json.loads(m.value())["url"] for m in read_topic(kafka_bootstrap, inp)
    )
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "wm"})
    try:
        ends = {p: c.get_watermark_offsets(TopicPartition(inp, p), timeout=10)[1] for p in range(3)}
    finally:
        c.close()
    assert sum(ends.values()) == N
    port = free_port()
    env = fleet_env(
        kafka_bootstrap,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL="0.5",
        DSTREAM_HTTP_PORT=str(port),
    )
    with run_fleet("examples/pageviews.py", workers=2, tmp=tmp_path, env=env) as fleet:
        wait_for(
            lambda: last_values(read_topic(kafka_bootstrap, out, idle_s=0.5)) == expected,
            90,
            "the running counts to equal the input",
        )
        status = _status(port)
        assert len(status["workers"]) == 2
        workers = _worker_http_ports(fleet.proc.pid, status, port)
        assert len(workers) == 2, f"worker HTTP ports not found: {workers}, {status['workers']}"

        # health: every process is live and ready
        for p in (port, *workers):
            assert _get(p, "/livez") == (200, "ok\n"), p
            assert _get(p, "/readyz") == (200, "ready\n"), p

        # input records: summed over the workers, per partition and in all, equal the input
        per_partition: collections.Counter[int] = collections.Counter()
        for p in workers:
            for labels, value in _samples(p)["dstream_input_records_total"]:
                if labels["topic"] == inp:
                    per_partition[int(labels["partition"])] += int(value)
        assert dict(per_partition) == ends
        assert sum(per_partition.values()) == N

        # the coordinator's batch histograms have observations; records per batch add up
        coord = _samples(port)
        for name in (
            "dstream_scheduling_delay_seconds_count",
            "dstream_processing_time_seconds_count",
            "dstream_total_delay_seconds_count",
        ):
            assert coord[name] and coord[name][0][1] > 0, f"{name}: {coord.get(name)}"
        completed = coord["dstream_batches_completed_total"][0][1]
        assert completed >= coord["dstream_total_delay_seconds_count"][0][1] > 0
        assert coord["dstream_batch_records_sum"][0][1] == N
        assert coord["dstream_live_workers"][0][1] == 2

        # receiver lag: one gauge per input partition across the workers, 0 once caught up
        def lags() -> dict[int, float]:
            out = {}
            for p in workers:
                for labels, value in _samples(p)["dstream_receiver_lag_records"]:
                    if labels["topic"] == inp:
                        out[int(labels["partition"])] = value
            return out

        wait_for(lambda: lags() == {0: 0, 1: 0, 2: 0}, 20, "receiver lag 0 on every partition")
        # workers ran tasks and hold blocks
        for p in workers:
            w = _samples(p)
            assert sum(v for _l, v in w["dstream_task_duration_seconds_count"]) > 0, p
            assert w["dstream_block_store_bytes"][0][1] >= 0
        assert fleet.interrupt() == 0, fleet.log
