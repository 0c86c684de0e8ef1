"""A real Prometheus, started on a free port from config/prometheus/prometheus.yml, finds pushed series.

Dagster runs are short-lived, so the cloud and archive monitoring points reach Prometheus through the
Pushgateway (pipeline.metrics.push_gauges); these tests go through that whole path.
"""

from __future__ import annotations

import pytest

from devstack.processes import Prometheus, Pushgateway
from pipeline.metrics import push_gauges
from tests.conftest import wait_until


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    gateway = Pushgateway(tmp_path_factory.mktemp("pushgateway")).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, pushgateway):
    """One Prometheus for the module: each test pushes under its own metric names."""
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), targets={"pushgateway": [pushgateway.target]}).start()
    yield server
    server.stop()


def test_prometheus_finds_gauges_a_run_pushed_to_the_pushgateway_by_name(prometheus, pushgateway, monkeypatch):
    monkeypatch.setenv("PIPELINE_PUSHGATEWAY_URL", pushgateway.url)
    assert push_gauges(
        "archive", {"parquet_files_written": ("Parquet files written", 3), "archival_lag_minutes": ("lag", 12.5)}
    )

    found = prometheus.wait_for_series(["parquet_files_written", "archival_lag_minutes"], timeout=30)

    assert {s["job"] for s in found["parquet_files_written"]} == {"archive"}


def test_pushed_labels_survive_the_scrape_because_of_honor_labels(prometheus, pushgateway, monkeypatch):
    monkeypatch.setenv("PIPELINE_PUSHGATEWAY_URL", pushgateway.url)
    push_gauges("drain", {"partner_delivery_success_rate": ("ratio", 0.97)}, labels={"partner": "acme"})

    result = wait_until(
        lambda: prometheus.query("partner_delivery_success_rate"), timeout=30, message="the pushed gauge"
    )

    [sample] = result
    assert sample["metric"]["job"] == "drain" and sample["metric"]["partner"] == "acme"
    assert float(sample["value"][1]) == pytest.approx(0.97)


def test_a_missing_series_times_out_naming_it_and_the_target_health(prometheus):
    wait_until(prometheus.target_health, timeout=30, message="the pushgateway target to be discovered")
    with pytest.raises(AssertionError, match=r"no series for \['sqs_queue_depth'\].*'job': 'pushgateway'.*'health'"):
        prometheus.wait_for_series(["sqs_queue_depth"], timeout=3)


def test_the_generated_config_keeps_the_templates_jobs_and_fills_in_the_ports(tmp_path):
    import yaml

    server = Prometheus(tmp_path, targets={"edge": ["127.0.0.1:1", "127.0.0.1:2"], "pushgateway": ["127.0.0.1:3"]})

    config = yaml.safe_load(server.write_config().read_text())

    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["edge"]["static_configs"] == [{"targets": ["127.0.0.1:1", "127.0.0.1:2"]}]
    assert jobs["pushgateway"]["honor_labels"] is True
    assert all(path.endswith("config/prometheus/alerts.yml") for path in config["rule_files"])


def test_a_target_for_an_unknown_scrape_job_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no scrape job named \\['edges'\\]"):
        Prometheus(tmp_path, targets={"edges": ["127.0.0.1:1"]}).write_config()


def test_each_pushgateway_starts_empty_so_tests_and_demos_do_not_share_pushed_metrics(tmp_path, monkeypatch):
    import requests

    first = Pushgateway(tmp_path / "first").start()
    try:
        monkeypatch.setenv("PIPELINE_PUSHGATEWAY_URL", first.url)
        assert push_gauges("isolation_probe", {"sqs_queue_depth": ("depth", 7)})
    finally:
        first.stop()
    second = Pushgateway(tmp_path / "second").start()
    try:
        assert 'job="isolation_probe"' not in requests.get(f"{second.url}/metrics", timeout=5).text
    finally:
        second.stop()
