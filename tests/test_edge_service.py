"""The edge service as a real process: forwarder traffic, bad input, claim check, bound, restart, internal events, metrics, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from devstack.tcp_proxy import TcpProxy
from edge_bridge.cli import AdminClient
from edge_bridge.forwarder import Forwarder
from edge_bridge.simulator import Simulator
from tests.conftest import PROJECT_ROOT, publish, receive_all, sample_envelope, wait_until
from tests.test_edge_faults import Collector, make_events, publish_resilient


def metric_samples(admin_url: str) -> dict[str, float]:
    import requests

    text = requests.get(admin_url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_simulated_devices_of_every_family_reach_sqs_through_forwarder_and_service(
    edge_factory, mosquitto, aws, tmp_path
):
    edge_factory()
    sim = Simulator(["site-001", "site-002"], malformed=0.05)
    forwarders = {site: Forwarder.connect(site, "127.0.0.1", mosquitto.port, tmp_path / "fwd") for site in sim.fleets}
    published = []
    for msg in sim.messages(600):
        envelope = forwarders[msg.site_id].forward(msg.family, msg.topic, msg.raw, msg.received_at)
        if envelope is not None:
            published.append(envelope)
    rejected = sum(sum(f.rejected.values()) for f in forwarders.values())
    for forwarder in forwarders.values():
        forwarder.client.publish("sites/ping", b"", qos=1).wait_for_publish(30)  # everything before it is acked
        forwarder.close()
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(lambda: collector.has_all({e.event_id for e in published}), 60, message="every forwarded event in SQS")
    assert {e.source for e in published} == {"ajax", "zigbee", "nvr", "idp"}
    assert rejected > 0 and rejected + len(published) == 600
    quarantined = sum(len(p.read_text().splitlines()) for p in (tmp_path / "fwd").glob("*quarantine.jsonl"))
    assert quarantined == rejected


def test_bad_envelopes_are_quarantined_with_reasons_and_do_not_stall_the_stream(edge_factory, mosquitto, aws, tmp_path):
    edge = edge_factory()
    good = sample_envelope()
    foreign = sample_envelope(site_id="site-999")
    topic = "sites/site-123/events/ajax/door_access"
    publish(
        mosquitto.port, topic, [b"\xff\xfe", '{"schema_version": "9.0"}', "not json", foreign.to_json(), good.to_json()]
    )
    bodies = wait_until(
        lambda: receive_all(aws.provisioned.queues["events"], timeout=0.5), 30, message="the good event in SQS"
    )
    assert [b["event_id"] for b in bodies] == [good.event_id]
    lines = (tmp_path / "edge_state" / "quarantine.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["reason"] for line in lines) == [
        "bad_json",
        "not_utf8",
        "site_mismatch",
        "unsupported_major",
    ]
    samples = metric_samples(edge.admin_url)
    assert samples["edge_events_quarantined_total{reason=site_mismatch}"] == 1


def test_event_over_the_sqs_size_limit_travels_by_claim_check_and_the_cloud_resolves_it(edge_factory, mosquitto, aws):
    from pipeline.drain import parse_window, receive_window
    from pipeline.stack import aws_client

    edge_factory()
    big = sample_envelope(payload={"snapshot_b64": "A" * 300_000})
    publish(mosquitto.port, big.topic, [big.to_json()])
    url = aws.provisioned.queues["events"]
    sqs = aws_client("sqs")
    window = wait_until(
        lambda: (w := receive_window(sqs, url, 10, wait_time_s=1)).messages and w, 30, message="the pointer in SQS"
    )
    assert len(window.messages[0].body) < 1024 and '"claim_check"' in window.messages[0].body
    parsed = parse_window(window, s3_client=aws_client("s3"))
    assert [(e.event_id, len(e.payload["snapshot_b64"])) for e in parsed.events] == [(big.event_id, 300_000)]
    assert parsed.quarantined == []


def test_at_the_retry_log_bound_the_service_holds_acks_reports_it_and_loses_nothing(edge_factory, mosquitto, aws):
    proxy = TcpProxy(aws.port).open()
    try:
        edge = edge_factory(sqs_endpoint=proxy.url, EDGE_RETRY_LOG_MAX_EVENTS="50", EDGE_PROBE_INTERVAL_S="0.5")
        admin = AdminClient(edge.admin_url)
        proxy.cut()
        events = make_events(200)
        publish_resilient(mosquitto.port, events)
        status = wait_until(
            lambda: (s := admin.status())["retry_log_full"] and s["held_unacked"] == 150 and s,
            30,
            message="the bound reported",
        )
        assert status["jobs_pending"] == 50
        healthy, _ = admin.health()
        assert healthy is False
        assert metric_samples(edge.admin_url)["edge_retry_log_full"] == 1
        proxy.open()
        collector = Collector(aws.provisioned.queues["events"])
        wait_until(
            lambda: collector.has_all({e.event_id for e in events}), 60, message="every held and logged event in SQS"
        )
        wait_until(lambda: admin.health()[0], 30, message="healthy again")
    finally:
        proxy.cut()


def test_a_restarted_service_delivers_the_jobs_its_predecessor_left_in_the_retry_log(edge_factory, mosquitto, aws):
    proxy = TcpProxy(aws.port).open()
    try:
        edge = edge_factory(sqs_endpoint=proxy.url)
        proxy.cut()
        events = make_events(500)
        publish_resilient(mosquitto.port, events)
        wait_until(
            lambda: AdminClient(edge.admin_url).status()["jobs_pending"] == 500, 30, message="500 jobs committed"
        )
        edge.kill9()
    finally:
        proxy.cut()
    edge_factory()  # SQS directly reachable now
    wait_until(lambda: "resumed: 500 pending jobs" in edge.log(), 30, message="the new service to resume the jobs")
    collector = Collector(aws.provisioned.queues["events"])
    wait_until(lambda: collector.has_all({e.event_id for e in events}), 60, message="the resumed jobs in SQS")


def test_internal_event_posted_to_the_admin_api_reaches_sqs_as_an_edge_event(edge_factory, aws):
    edge = edge_factory(EDGE_SITE_ID="site-123")
    accepted = AdminClient(edge.admin_url).emit("check_in", {"user": "u-17", "job": "J-88"}, device_id="kiosk-1")
    bodies = wait_until(
        lambda: receive_all(aws.provisioned.queues["events"], timeout=0.5), 30, message="the internal event in SQS"
    )
    assert [(b["event_id"], b["source"], b["event_type"], b["site_id"], b["device_id"]) for b in bodies] == [
        (accepted["event_id"], "edge", "check_in", "site-123", "kiosk-1")
    ]


def test_metrics_expose_the_seed_names_and_count_deliveries(edge_factory, mosquitto, aws):
    edge = edge_factory()
    events = make_events(30)
    publish(mosquitto.port, events[0].topic, [e.to_json() for e in events])
    wait_until(
        lambda: metric_samples(edge.admin_url).get("edge_events_delivered_total{path=realtime}") == 30,
        30,
        message="30 deliveries counted",
    )
    samples = metric_samples(edge.admin_url)
    assert samples["jobs_pending_count"] == 0 and samples["dlq_size"] == 0
    assert samples["mqtt_message_rate"] > 0
    assert samples["edge_mqtt_messages_received_total"] == 30
    assert samples["edge_sqs_send_seconds_count"] >= 3


def test_cli_reports_status_and_replays_an_empty_dlq(edge_factory):
    edge = edge_factory()
    cli = [sys.executable, "-m", "edge_bridge.cli", "--admin-url", edge.admin_url]
    status = subprocess.run(cli + ["status"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["jobs_pending"] == 0
    replay = subprocess.run(cli + ["dlq", "replay"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert replay.stdout.strip() == "replayed 0 events from the DLQ"
