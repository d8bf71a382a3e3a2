"""The chart's alert rules: ``promtool check rules`` and ``promtool test rules``.

The rules live in one file, ``helm/dstream-fleet/files/alerts.yaml``; the chart's
PrometheusRule embeds it verbatim (tests/e2e/test_chart.py checks the rendered object equals
it), so what promtool checks here is exactly what the chart ships. The promtool unit tests
are in ``tests/unit/ops/alerts/alerts_test.yaml``: per alert, a fleet that makes it fire and
one that must stay silent.

promtool comes with Debian's ``prometheus`` package (``make test-setup`` installs it); without it
these tests are skipped, saying so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "helm" / "dstream-fleet" / "files" / "alerts.yaml"
TESTS = Path(__file__).resolve().parent / "alerts" / "alerts_test.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
README = ROOT / "README.md"
PROMTOOL = shutil.which("promtool")
#: The alerts issue 17 asks for, each with its own rule.
EXPECTED_ALERTS = {
    "DStreamBatchesFallingBehind",
    "DStreamSchedulingDelayGrowing",
    "DStreamWorkerLost",
    "DStreamReceiverLagGrowing",
    "DStreamDeadLetters",
    "DStreamCheckpointsFailing",
    "DStreamCheckpointsStale",
    "DStreamDependencyDegraded",
    "DStreamNoLeader",
}

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install Debian's `prometheus` package (`make test-setup` does)",
)


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_alert_has_labels_annotations_and_a_runbook_section() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_ALERTS
    ops_doc = OPERATIONS.read_text()
    alerts_section = ops_doc[ops_doc.index("\n## Alerts") :]
    readme = README.read_text()
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        ann = r["annotations"]
        assert ann["summary"] and ann["description"], r["alert"]
        assert "Look first at" in ann["description"], r["alert"]
        anchor = r["alert"].lower()
        assert ann["runbook_url"] == f"docs/operations.md#{anchor}", r["alert"]
        assert f"\n### {r['alert']}\n" in alerts_section, f"no runbook section for {r['alert']}"
        assert f"`{r['alert']}`" in readme, f"README does not list {r['alert']}"
    # ... and the docs name no alert that does not exist
    documented = set(re.findall(r"^### (DStream\w+)$", alerts_section, flags=re.MULTILINE))
    assert documented == EXPECTED_ALERTS


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    doc = yaml.safe_load(TESTS.read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        namespaces = {
            m for s in case["input_series"] for m in re.findall(r'namespace="(\w+)"', s["series"])
        }
        for t in case["alert_rule_test"]:
            fired = {a["exp_labels"]["namespace"] for a in t["exp_alerts"]}
            if fired:
                fires.add(t["alertname"])
            if namespaces - fired:  # a fleet in the input for which nothing fires
                silent.add(t["alertname"])
    assert fires == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS


@needs_promtool
def test_promtool_check_rules() -> None:
    out = _promtool("check", "rules", str(RULES), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in out.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    out = _promtool("test", "rules", str(TESTS), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
@pytest.mark.parametrize("alert", sorted(EXPECTED_ALERTS))
def test_promtool_tests_catch_a_rule_that_never_fires(alert: str, tmp_path: Path) -> None:
    """The unit tests can fail: with one alert's expression replaced by one that never
    matches, ``promtool test rules`` reports that alert."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                rule["expr"] = "vector(1) == 0"
    rules = tmp_path / "alerts.yaml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    tests = yaml.safe_load(TESTS.read_text())
    tests["rule_files"] = [str(rules)]
    test_file = tmp_path / "alerts_test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    out = _promtool("test", "rules", str(test_file), cwd=tmp_path)
    assert out.returncode != 0, out.stdout
    failed = set(re.findall(r"alertname: (\w+),", out.stdout + out.stderr))
    assert failed == {alert}, out.stdout + out.stderr
