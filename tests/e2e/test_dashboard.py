"""The Grafana dashboard shipped in the chart queries only metrics that ``ops.metrics`` defines."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.metrics import ALL_METRIC_NAMES

DASHBOARD = (
    Path(__file__).resolve().parents[2]
    / "helm"
    / "dstream-fleet"
    / "dashboards"
    / "dstream-fleet.json"
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
#: What a metric selector can look like once strings, label matchers, ranges and grouping
#: clauses are removed: an identifier not followed by "(" (which would make it a function).
_IDENT = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # grouping clauses
    return {m for m in _IDENT.findall(text) if m.lower() not in PROMQL_WORDS}


def base_name(metric: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix) and metric.removesuffix(suffix) in ALL_METRIC_NAMES:
            return metric.removesuffix(suffix)
    return metric


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard["panels"]) if p.get("type") != "row"]


def test_dashboard_is_valid_grafana_json(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables


def test_dashboard_has_panels(query_panels: list[dict[str, Any]]) -> None:
    assert len(query_panels) >= 15
    for p in query_panels:
        assert p["title"], p
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])


def test_every_expr_uses_only_known_metrics(query_panels: list[dict[str, Any]]) -> None:
    known = set(ALL_METRIC_NAMES)
    for p in query_panels:
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names, f"panel {p['title']!r}: no metric in {t['expr']!r}"
            unknown = {n for n in names if base_name(n) not in known}
            assert not unknown, f"panel {p['title']!r}: unknown metrics {unknown} in {t['expr']!r}"


def test_dashboard_covers_the_metrics(query_panels: list[dict[str, Any]]) -> None:
    used = {
        base_name(n) for p in query_panels for t in p["targets"] for n in metric_names(t["expr"])
    }
    # Every metric the fleet exports has a panel, so a new one cannot be forgotten silently.
    assert set(ALL_METRIC_NAMES) <= used, set(ALL_METRIC_NAMES) - used


def test_quantile_panels_use_histogram_buckets(query_panels: list[dict[str, Any]]) -> None:
    titles = {p["title"] for p in query_panels}
    for title in ("Scheduling delay", "Processing time", "Total delay"):
        assert title in titles
        (panel,) = [p for p in query_panels if p["title"] == title]
        exprs = [t["expr"] for t in panel["targets"]]
        assert any(e.startswith("histogram_quantile(0.5,") for e in exprs)
        assert any(e.startswith("histogram_quantile(0.99,") for e in exprs)
        assert all("_bucket{" in e for e in exprs)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'sum by (topic) (rate(dstream_input_records_total{job=~"$job"}[5m]))',
            {"dstream_input_records_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le, stage) (rate(x_bucket[1m])))",
            {"x_bucket"},
        ),
        ("a / on (pod) group_left b", {"a", "b"}),
        ("max(foo) > bool 3", {"foo"}),
    ],
)
def test_metric_name_extraction(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_unknown_metric_is_caught() -> None:
    assert base_name("dstream_total_delay_seconds_bucket") == "dstream_total_delay_seconds"
    assert base_name("dstream_not_a_metric_bucket") not in ALL_METRIC_NAMES
