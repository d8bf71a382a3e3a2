"""Where a worker's time goes under load: py-spy on a 2-worker page-view fleet.

The fleet (``examples/pageviews.py``, 2 workers) works through the throughput benchmark's
pre-loaded topic (created if missing); once it is busy, ``py-spy record`` samples each
worker process for ``--seconds`` (100 Hz, every thread, idle samples excluded): worker 1
as a flame graph (``bench/results/worker-profile.svg``), every worker as collapsed
stacks, from which the self and inclusive shares of the hottest functions are computed.

    .venv/bin/python -m bench.profile_fleet [--seconds 10]

Needs ``py-spy`` in the venv (``.venv/bin/pip install py-spy``) and ptrace rights
(root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import _common as c

PROJECT = ("engine/", "ops/", "ingest/", "state/", "examples/")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def parse_collapsed(path: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Self and inclusive sample counts per frame of a py-spy ``raw`` (collapsed) file."""
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        total += k
        frames = [_short(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    return self_, incl, total


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``path relative to the repo:func`` (lines merged)."""
    func, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    root = str(c.ROOT) + "/"
    if where.startswith(root):
        where = where[len(root) :]
    elif "site-packages/" in where:
        where = where.split("site-packages/", 1)[1]
    elif "/lib/python" in where:
        where = "stdlib/" + where.split("/lib/python", 1)[1].split("/", 1)[-1]
    return f"{where}:{func}" if where else func


def table(counter: collections.Counter[str], total: int, n: int, only_project: bool) -> str:
    lines = ["| function | % of worker samples |", "|---|---|"]
    shown = 0
    for f, k in counter.most_common():
        if only_project and not f.startswith(PROJECT):
            continue
        lines.append(f"| `{f}` | {k / total * 100:.1f}% |")
        shown += 1
        if shown >= n:
            break
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--records", type=int, default=2_000_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--keys", type=int, default=1_000)
    p.add_argument("--fragment", default="profile.md")
    args = p.parse_args(argv)
    spy = py_spy()
    if spy is None:
        text = "## Worker profile\n\npy-spy is not installed: `.venv/bin/pip install py-spy`.\n"
        c.write_fragment(args.fragment, text)
        return 0
    c.print_machine()
    bootstrap, _ = c.services()
    topic = f"bench-pageviews-{args.records}-{args.partitions}p-{args.keys}k"
    c.preload(bootstrap, topic, args.records, args.partitions, args.keys)
    out = c.unique("bench-prof-out")
    c.create_topic(bootstrap, out, 1)
    env = {"PAGEVIEWS_TOPIC": topic, "PAGEVIEWS_OUTPUT": out, "DSTREAM_BATCH_INTERVAL": "1.0"}
    raws: list[Path] = []
    with c.run_fleet("examples/pageviews.py", workers=2, env=env, log_dir=c.RESULTS / "logs") as f:
        f.wait_ready()
        time.sleep(1.5)  # the first blocks are sealed and tasks are running
        workers = f.roles()["worker"]
        spies = []
        for i, pid in enumerate(workers):
            raw = c.RESULTS / "logs" / f"worker-{i + 1}.collapsed"
            raws.append(raw)
            base = [spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds))]
            base += ["--rate", "100", "--nonblocking"]
            spies.append(
                subprocess.Popen(
                    [*base, "--format", "raw", "-o", str(raw)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            if i == 0:
                svg = c.RESULTS / "worker-profile.svg"
                spies.append(
                    subprocess.Popen(
                        [*base, "--format", "flamegraph", "-o", str(svg)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        for s in spies:
            s.wait(args.seconds + 60)
        f.status()
        processed = f.processed()
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for raw in raws:
        if raw.exists():
            s, i_, t = parse_collapsed(raw)
            self_.update(s)
            incl.update(i_)
            total += t
    if not total:
        text = "## Worker profile\n\npy-spy recorded no samples (ptrace not permitted?).\n"
        c.write_fragment(args.fragment, text)
        return 1
    lines = [
        "## Worker profile (py-spy)",
        "",
        f"Command: `.venv/bin/python -m bench.profile_fleet --seconds {args.seconds:g}` "
        f"(`py-spy record --rate 100 --nonblocking --format raw` on each of the 2 workers of "
        f"`examples/pageviews.py` working through the {args.records:,}-record pre-loaded "
        f"topic at 1 s batches; {total:,} non-idle samples over all threads; "
        f"{processed:,} records completed while profiling).",
        "",
        "Flame graph of worker 1: [worker-profile.svg](worker-profile.svg).",
        "",
        "Self time (the frame on top of the stack; time inside a C call such as "
        "`Consumer.consume` or `json.loads`' scanner counts for the Python frame that made "
        "it), every function:",
        "",
        table(self_, total, 15, only_project=False),
        "",
        "Inclusive time (the frame anywhere on the stack), project code:",
        "",
        table(incl, total, 20, only_project=True),
        "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    c.write_fragment(args.fragment, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
