"""The alert rules are valid Prometheus rules, and their unit tests pin every threshold and `for:`.

Both checks run the real `promtool` (Debian package `prometheus`). The mutation cases prove the unit
tests can fail: each one changes a single rule's threshold or duration in a copy of alerts.yml and
expects `promtool test rules` to reject it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parent.parent / "config" / "prometheus"
ALERTS = RULES_DIR / "alerts.yml"
# Every `promtool test rules` file for alerts.yml (alerts_test.yml, and one per later group of rules).
ALERTS_TESTS = sorted(RULES_DIR.glob("alerts*_test.yml"))


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: run `make setup` (Debian package prometheus)"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules_accepts_the_alert_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_promtool_unit_tests_of_the_alert_rules_pass():
    assert [p.name for p in ALERTS_TESTS] == [
        "alerts_freshness_test.yml",
        "alerts_quarantine_test.yml",
        "alerts_reconciliation_test.yml",
        "alerts_retry_log_test.yml",
        "alerts_test.yml",
    ]
    result = promtool("test", "rules", *map(str, ALERTS_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_names_a_runbook_section_that_exists():
    runbook = (RULES_DIR.parent.parent / "docs" / "runbook.md").read_text()
    anchors = set()
    for line in runbook.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add("".join(c for c in title if c.isalnum() or c in " -").replace(" ", "-"))
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    missing = {
        r["alert"]: r["annotations"]["runbook"]
        for r in rules
        if r["annotations"]["runbook"].split("#")[1] not in anchors
    }
    assert not missing, f"runbook anchors not found in docs/runbook.md: {missing}"


# (alert, field, old, new): one wrong threshold or duration each.
MUTATIONS = [
    ("EdgeDlqNotEmpty", "for", "1h", "59m"),
    ("EdgeDlqNotEmpty", "for", "1h", "61m"),
    ("EdgeDlqNotEmpty", "expr", "> 0", "> 1"),
    ("EdgeDlqNotEmpty", "expr", "> 0", ">= 0"),
    ("EdgePendingJobsGrowing", "for", "15m", "14m"),
    ("EdgePendingJobsGrowing", "for", "15m", "16m"),
    ("EdgePendingJobsGrowing", "expr", "[10m]) > 0", "[10m]) >= 0"),
    ("EdgePendingJobsGrowing", "expr", "[10m]) > 0", "[10m]) < 0"),
    ("PartnerDeliverySuccessLow", "for", "15m", "14m"),
    ("PartnerDeliverySuccessLow", "for", "15m", "16m"),
    ("PartnerDeliverySuccessLow", "expr", "< 0.99", "<= 0.99"),
    ("PartnerDeliverySuccessLow", "expr", "< 0.99", "< 0.98"),
    ("ConsumerLagGrowing", "for", "10m", "9m"),
    ("ConsumerLagGrowing", "for", "10m", "11m"),
    ("ConsumerLagGrowing", "expr", "[10m]) > 0", "[10m]) >= 0"),
    ("ConsumerLagGrowing", "expr", "[10m]) > 0", "[10m]) < 0"),
    ("ArchivalLagHigh", "for", "5m", "4m"),
    ("ArchivalLagHigh", "for", "5m", "6m"),
    ("ArchivalLagHigh", "expr", "> 90", ">= 90"),
    ("ArchivalLagHigh", "expr", "> 90", "> 91"),
    ("EdgeQuarantineDropping", "expr", "[10m]) > 0", "[5m]) > 0"),
    ("EdgeQuarantineDropping", "expr", "[10m]) > 0", "[15m]) > 0"),
    ("EdgeQuarantineDropping", "expr", "> 0", ">= 0"),
    ("EdgeQuarantineDropping", "expr", "> 0", "> 1"),
    (
        "EdgeQuarantineDropping",
        "expr",
        "increase(edge_quarantine_dropped_total",
        "increase(edge_events_quarantined_total",
    ),
    ("EdgeRetryLogSalvaged", "expr", "_lost_total) > 0", "_lost_total) > 1"),
    ("EdgeRetryLogSalvaged", "expr", "loss_unknown > 0", "loss_unknown > 1"),
    ("EdgeRetryLogSalvaged", "expr", "sum without (table) (edge_retry_log_lost_total)", "edge_retry_log_lost_total"),
    ("EdgeRetryLogMovedAside", "expr", "> 0", "> 1"),
    ("EdgeRetryLogMovedAside", "expr", "> 0", ">= 0"),
    ("ArchiveFreshnessStale", "expr", "> 600", "> 660"),
    ("ArchiveFreshnessStale", "expr", "> 600", ">= 600"),
    ("ArchiveFreshnessStale", "expr", "> 600", "> 540"),
    ("ArchiveFreshnessStale", "expr", ', instance="freshness"', ""),
    ("ArchiveFreshnessMissing", "for", "15m", "14m"),
    ("ArchiveFreshnessMissing", "for", "15m", "16m"),
    ("ArchiveFreshnessMissing", "expr", ', instance="freshness"', ""),
    ("ReconciliationMismatch", "for", "10m", "9m"),
    ("ReconciliationMismatch", "for", "10m", "11m"),
    ("ReconciliationMismatch", "expr", "> 0", ">= 0"),
    ("ReconciliationMismatch", "expr", "> 0", "> 1"),
    ("ReconciliationMismatch", "expr", "by (site, hour)", "by (site)"),
]


@pytest.mark.parametrize(("alert", "field", "old", "new"), MUTATIONS, ids=[f"{a}-{f}-{n}" for a, f, _, n in MUTATIONS])
def test_rule_unit_tests_reject_a_wrong_threshold_or_duration(tmp_path, alert, field, old, new):
    rules = yaml.safe_load(ALERTS.read_text())
    [rule] = [r for group in rules["groups"] for r in group["rules"] if r["alert"] == alert]
    assert old in str(rule[field]), f"{alert}.{field} no longer contains {old!r}: update this mutation"
    rule[field] = str(rule[field]).replace(old, new)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    for tests in ALERTS_TESTS:
        shutil.copy(tests, tmp_path / tests.name)
    assert promtool("check", "rules", "alerts.yml", cwd=tmp_path).returncode == 0, (
        "the mutant must still be a valid rule"
    )
    result = promtool("test", "rules", *(tests.name for tests in ALERTS_TESTS), cwd=tmp_path)
    assert result.returncode != 0, f"promtool test rules accepted {alert} with {field} {old!r} -> {new!r}"
