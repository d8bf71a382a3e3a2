"""Text tables of the coordinator's status (``dstream status``)."""

from __future__ import annotations

from typing import Any


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ms(x: float | None) -> str | None:
    return None if x is None else f"{x * 1000:.0f} ms"


def format_status(st: dict[str, Any]) -> str:
    """Batches (with delays), workers and receivers as aligned tables."""
    out = [
        f"app {st['app']}  epoch {st['epoch']}  next batch {st['next_batch']}  "
        f"pending {len(st['pending'])}",
        "",
    ]
    out.append(
        _table(
            ["batch", "records", "scheduling delay", "processing time", "total delay"],
            [
                [
                    b["batch"],
                    b["records"],
                    _ms(b["scheduling_delay"]),
                    _ms(b["processing_time"]),
                    _ms(b["total_delay"]),
                ]
                for b in st["batches"][-10:]
            ],
        )
    )
    out += [
        "",
        _table(
            ["worker", "slots", "blocks", "store bytes", "received"],
            [
                [w["id"], w["slots"], w["blocks"], w["store_bytes"], w["received"]]
                for w in st["workers"]
            ],
        ),
    ]
    out += [
        "",
        _table(
            ["topic", "partition", "owner", "position", "lag"],
            [
                [r["topic"] or "(queue)", r["partition"], r["owner"], r["position"], r.get("lag")]
                for r in st["receivers"]
            ],
        ),
    ]
    return "\n".join(out)
