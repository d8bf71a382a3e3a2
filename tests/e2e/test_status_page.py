"""The coordinator's status page in headless Chromium, during a real page-view fleet run.

Chromium is Debian's ``chromium`` (``make test-setup`` installs it). The test fails, it does not
skip, when it is missing: the status page is part of what ``make test`` vouches for.

The screenshot goes to ``test-output/status-page.png`` (gitignored). With
``DSTREAM_UPDATE_SCREENSHOTS=1`` it is also copied to ``docs/img/status-page.png``, the
image the README and ``docs/operations.md`` show.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from ops.tools.devservices import free_port
from ops.tools.produce import produce_pageviews
from tests.fleetkit import ROOT, completed_batches, fleet_env, http_status, run_fleet, wait_for

#: Debian's binary; ``shutil.which`` also finds ``chromium`` elsewhere on PATH.
CHROMIUM_PATHS = ("/usr/bin/chromium",)
#: Flags that keep headless Chromium off the network (the machine has none) and quiet.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--no-proxy-server",
)
#: Virtual time given to the page: the first poll of /api/status is immediate, a few more
#: follow within 3 s (one per second).
VIRTUAL_TIME_MS = 3000
OUTPUT = ROOT / "test-output"
DOCS_IMG = ROOT / "docs" / "img" / "status-page.png"


def _chromium() -> str:
    found = shutil.which("chromium") or next((p for p in CHROMIUM_PATHS if Path(p).is_file()), None)
    if found is None:
        pytest.fail(
            "chromium is not installed: run `make test-setup` (it installs Debian's chromium "
            "as root) or `apt-get install chromium`"
        )
    return found


def _chrome(binary: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"chromium-profile-{len(list(tmp.iterdir()))}"
    profile.mkdir()
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


class _Tables(HTMLParser):
    """Rows (lists of cell texts) by table id and row class, plus SVG series paths."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], list[list[str]]] = {}
        self.series = 0
        self._table = ""
        self._row: list[str] | None = None
        self._cls = ""
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "table":
            self._table = a.get("id") or ""
        elif tag == "tr":
            self._row, self._cls = [], classes[0] if classes else ""
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "path" and "series" in classes:
            self.series += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.setdefault((self._table, self._cls), []).append(self._row)
            self._row = None
        elif tag == "table":
            self._table = ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _batches(port: int, fleet: Any) -> int:
    """Completed batches the coordinator reports; 0 while it is not up or not leading."""
    if fleet.proc.poll() is not None:
        raise AssertionError(f"the fleet exited early:\n{fleet.log}")
    return completed_batches(port)


def test_status_page_shows_batches_workers_and_receivers(
    kafka_bootstrap: str, redis_url: str, app_id: str, new_topic: Any, tmp_path: Path
) -> None:
    chromium = _chromium()
    inp, out = new_topic(3), new_topic(1)
    produce_pageviews(kafka_bootstrap, inp, rate=0, count=2000, keys=50, seed=1)
    port = free_port()
    env = fleet_env(
        kafka_bootstrap,
        redis_url,
        app_id,
        (inp, out),
        DSTREAM_BATCH_INTERVAL="0.5",
        DSTREAM_HTTP_PORT=str(port),
    )
    # a steady input while the page is loaded, so the rate chart has a shape
    feeder = threading.Thread(
        target=produce_pageviews,
        args=(kafka_bootstrap, inp),
        kwargs={"rate": 400, "duration": 15, "keys": 50, "seed": 2},
        daemon=True,
    )
    with run_fleet("examples/pageviews.py", workers=2, tmp=tmp_path, env=env) as fleet:
        feeder.start()
        wait_for(
            lambda: _batches(port, fleet) >= 8,
            90,
            "eight completed batches in /api/status",
        )
        url = f"http://127.0.0.1:{port}/"
        budget = f"--virtual-time-budget={VIRTUAL_TIME_MS}"
        dom = _chrome(chromium, tmp_path, budget, "--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        OUTPUT.mkdir(exist_ok=True)
        shot = OUTPUT / "status-page.png"
        shot.unlink(missing_ok=True)
        res = _chrome(
            chromium, tmp_path, budget, "--window-size=1280,1150", f"--screenshot={shot}", url
        )
        assert res.returncode == 0, res.stderr[-2000:]
        status = http_status(port)
        feeder.join(30)
        code = fleet.interrupt()
        log = fleet.log
    assert code == 0, log

    page = _Tables()
    page.feed(dom.stdout)
    batch_rows = page.rows.get(("batches", "batch-row"), [])
    done = [r for r in batch_rows if r[-1] == "done"]
    assert len(done) >= 8, f"batch table not filled: {batch_rows}\n{dom.stdout[-3000:]}"
    numbers = [int(r[0]) for r in done]
    assert numbers == sorted(numbers, reverse=True), "latest batch first"
    assert sum(int(r[2].replace(",", "")) for r in done) > 0, "records column is empty"
    assert all(r[4].endswith(("ms", " s")) for r in done), "scheduling delays missing"
    assert page.series == 4, "one line per chart: rate, scheduling, processing, total"
    workers = page.rows.get(("workers", "worker-row"), [])
    assert sorted(r[0] for r in workers) == sorted(w["id"] for w in status["workers"])
    receivers = page.rows.get(("receivers", "receiver-row"), [])
    assert sorted((r[0], r[1]) for r in receivers) == [(inp, str(p)) for p in range(3)]

    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot written"
    if os.environ.get("DSTREAM_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMG)
