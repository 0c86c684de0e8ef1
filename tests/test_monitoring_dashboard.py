"""The Grafana dashboard and its provisioning agree with each other and with the monitoring contract.

Grafana itself is not run: the checks read the JSON and YAML a Grafana would load, and every panel
query is parsed by the real promtool, so a typo in PromQL fails here rather than on a wall screen.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

GRAFANA = Path(__file__).resolve().parent.parent / "config" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pipeline.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "pipeline.yml"

MONITORING_POINTS = {
    "Edge": {"jobs_pending_count", "dlq_size", "mqtt_message_rate"},
    "Cloud": {"sqs_queue_depth", "consumer_lag", "processing_error_rate", "partner_delivery_success_rate"},
    "Archive": {"parquet_files_written", "archival_lag_minutes"},
}
ALL_POINTS = set().union(*MONITORING_POINTS.values())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels_by_row(dashboard: dict) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    current = None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = list(panel.get("panels", []))
        else:
            assert current is not None, f"panel {panel['title']!r} comes before any row"
            rows[current].append(panel)
    return rows


def metric_names(expr: str) -> set[str]:
    return {name for name in ALL_POINTS if re.search(rf"\b{name}\b", expr)}


def test_dashboard_has_edge_cloud_and_archive_rows_in_that_order(dashboard):
    assert list(panels_by_row(dashboard)) == ["Edge", "Cloud", "Archive"]


def test_every_panel_queries_one_of_the_nine_monitoring_points_of_its_own_row(dashboard):
    for row, panels in panels_by_row(dashboard).items():
        assert panels, f"row {row} has no panels"
        for panel in panels:
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            for target in panel["targets"]:
                names = metric_names(target["expr"])
                assert names, f"panel {panel['title']!r} queries none of the nine points: {target['expr']}"
                assert names <= MONITORING_POINTS[row], f"panel {panel['title']!r} in row {row} queries {names}"


def test_each_of_the_nine_monitoring_points_has_a_panel(dashboard):
    shown = set().union(
        *(metric_names(t["expr"]) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"])
    )
    assert shown == ALL_POINTS


def test_every_panel_uses_the_provisioned_prometheus_data_source_by_uid(dashboard):
    [source] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"]), panel["title"]


def test_panel_ids_are_unique_and_panels_do_not_overlap(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine


def test_every_panel_query_is_valid_promql(dashboard, tmp_path):
    exprs = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:panel_{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [shutil.which("promtool"), "check", "rules", str(tmp_path / "panels.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_provisioning_loads_files_and_takes_paths_from_the_environment():
    [provider] = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("$")
    [source] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["url"].startswith("$"), "the Prometheus URL comes from Grafana's environment, not a hard-coded port"
