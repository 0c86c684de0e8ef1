"""All nine monitoring points reach a real Prometheus by name, each from the part that owns it.

Real parts on free ports: Mosquitto, the local SQS/S3, the edge service (scraped on its admin port),
the priority consumer service `python -m pipeline.consumers` (scraped on its /metrics), a Pushgateway
that real Dagster runs push to (a drain run, a partner delivery run, an archive compaction), and
Prometheus configured from config/prometheus/prometheus.yml.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from dagster import materialize

from devstack.partner_receiver import PartnerReceiver
from devstack.processes import Prometheus, Pushgateway, free_port, stop_process
from pipeline.archive import hour_key
from pipeline.assets import events_archive
from pipeline.jobs import drain_events_job
from pipeline.partner_jobs import partner_delivery_job
from pipeline.resources import ArchiveStore, DrainSettings, RoutingSettings, SQSResource
from pipeline.routing.config import load_routing_config
from pipeline.routing.provisioning import provision_routing
from pipeline.stack import aws_client
from tests.conftest import PROJECT_ROOT, publish, queue_counts, sample_envelope, wait_until
from tests.test_routing_config import routing_file

NINE = {
    "edge": ["jobs_pending_count", "dlq_size", "mqtt_message_rate"],
    "cloud": ["sqs_queue_depth", "consumer_lag", "processing_error_rate", "partner_delivery_success_rate"],
    "archive": ["parquet_files_written", "archival_lag_minutes"],
}


def resources():
    return {
        "sqs": SQSResource(events_queue="events"),
        "archive": ArchiveStore(bucket="events-archive"),
        "drain_settings": DrainSettings(window_seconds=5),
        "routing": RoutingSettings(),
    }


@pytest.fixture
def partner(tmp_path, aws, monkeypatch):
    receiver = PartnerReceiver("whsec_" + base64.b64encode(os.urandom(24)).decode()).start()
    monkeypatch.setenv("PARTNER_WATCHER_SECRET", receiver.secret)
    path = routing_file(
        tmp_path,
        [
            {
                "name": "watcher",
                "webhook": receiver.url,
                "secret_env": "PARTNER_WATCHER_SECRET",
                "subscriptions": ["door_access"],
                "allowed_fields": ["event_id", "event_type", "site_id"],
                "timeout_s": 5,
            }
        ],
    )
    monkeypatch.setenv("PIPELINE_ROUTING_CONFIG", str(path))
    provision_routing(aws_client("sqs"), load_routing_config(path))
    yield receiver
    receiver.stop()


@pytest.fixture
def pushgateway(tmp_path, monkeypatch):
    gateway = Pushgateway(tmp_path / "pushgateway").start()
    monkeypatch.setenv("PIPELINE_PUSHGATEWAY_URL", gateway.url)
    yield gateway
    gateway.stop()


@pytest.fixture
def consumer(tmp_path, aws, partner):
    """`python -m pipeline.consumers` as a real child process with its /metrics on a free port."""
    port = free_port()
    env = {
        **os.environ,
        "PIPELINE_CONSUMER_METRICS_PORT": str(port),
        "PIPELINE_CONSUMER_DB": str(tmp_path / "consumer.duckdb"),
        "PYTHONUNBUFFERED": "1",
    }
    log = open(tmp_path / "consumer.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.consumers"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.metrics_target = f"127.0.0.1:{port}"
    yield proc
    stop_process(proc)


def test_prometheus_finds_all_nine_monitoring_points_by_name_from_the_running_services(
    tmp_path, aws, mosquitto, edge_factory, partner, pushgateway, consumer
):
    edge = edge_factory()
    prometheus = Prometheus(
        tmp_path / "prometheus",
        targets={
            "edge": [edge.admin_url.removeprefix("http://")],
            "consumers": [consumer.metrics_target],
            "pushgateway": [pushgateway.target],
        },
    ).start()
    try:
        events = [sample_envelope(device_id=f"door-{i}") for i in range(20)] + [
            sample_envelope(event_type="intrusion_alert", device_id="pir-1")
        ]
        publish(mosquitto.port, events[0].topic, [e.to_json() for e in events[:20]])
        publish(mosquitto.port, events[20].topic, [events[20].to_json()])
        wait_until(
            lambda: queue_counts(aws.provisioned.queues["events"])[0] >= len(events), 30, message="the events in SQS"
        )

        assert drain_events_job.execute_in_process(resources=resources()).success
        assert partner_delivery_job.execute_in_process(
            run_config={"ops": {"deliver_partner_queue": {"config": {"partner": "watcher"}}}}, resources=resources()
        ).success
        assert materialize([events_archive], partition_key=hour_key(events[0].timestamp), resources=resources()).success

        found = prometheus.wait_for_series([name for names in NINE.values() for name in names], timeout=90)
        # consumer_lag comes from two places (the consumer's /metrics and the drain run's push); the
        # consumer's may be scraped first, so wait for the pushed one too.
        found["consumer_lag"] = wait_until(
            lambda: (
                (series := prometheus.series("consumer_lag"))
                and "pipeline_drain" in {s["job"] for s in series}
                and series
            ),
            60,
            message="consumer_lag pushed by the drain run",
        )
    finally:
        prometheus.stop()

    assert {s["job"] for name in NINE["edge"] for s in found[name]} == {"edge"}
    assert {s["job"] for s in found["partner_delivery_success_rate"]} == {"pipeline_partner_delivery"}
    assert {s["job"] for name in NINE["archive"] for s in found[name]} == {"pipeline_archive"}
    assert {s["job"] for s in found["consumer_lag"]} >= {"pipeline_drain"}
    assert len(partner.accepted) == 20, "the partner got the door events the drain run routed to it"
