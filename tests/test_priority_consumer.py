"""The priority consumer: high first under load, each event handled once, status, automation, /metrics."""

import base64
import os
import subprocess
import sys
import time
from datetime import UTC

import duckdb
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from devstack.partner_receiver import PartnerReceiver
from devstack.processes import free_port, stop_process
from pipeline.consumers.service import ConsumerSettings, PriorityConsumer
from pipeline.routing.config import load_routing_config
from pipeline.routing.destinations import send_all
from pipeline.routing.logs import read_log
from pipeline.routing.provisioning import provision_routing
from pipeline.stack import aws_client, s3_filesystem
from tests.conftest import PROJECT_ROOT, queue_counts, sample_envelope, wait_until
from tests.test_routing_config import routing_file

AUTOMATION = {
    "rules": [
        {
            "event_type": "intrusion_alert",
            "incident": True,
            "webhook_env": "TEST_AUTOMATION_URL",
            "secret_env": "TEST_AUTOMATION_SECRET",
        }
    ]
}


@pytest.fixture
def priority(tmp_path, aws, monkeypatch):
    path = routing_file(tmp_path, [], automation=AUTOMATION)
    monkeypatch.setenv("PIPELINE_ROUTING_CONFIG", str(path))
    routing = load_routing_config(path)
    urls = provision_routing(aws_client("sqs"), routing)
    return routing, {p: urls[routing.priority.queue_for(p)] for p in ("high", "medium", "low")}


def send(url, bodies, sqs=None):
    sqs = sqs or aws_client("sqs")
    for i in range(0, len(bodies), 10):
        sqs.send_message_batch(
            QueueUrl=url, Entries=[{"Id": str(n), "MessageBody": b} for n, b in enumerate(bodies[i : i + 10])]
        )


def consumer_in_process(routing, tmp_path, s3=None, **settings):
    return PriorityConsumer(
        routing,
        aws_client("sqs"),
        ConsumerSettings(db_path=str(tmp_path / "consumer.duckdb"), **settings),
        s3_filesystem(),
        s3,
    ).start()


def automation_endpoint(monkeypatch, **behaviour) -> PartnerReceiver:
    """A signed-webhook receiver that the AUTOMATION rule's environment variables point at."""
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    receiver = PartnerReceiver(secret, **behaviour).start()
    monkeypatch.setenv("TEST_AUTOMATION_URL", receiver.url)
    monkeypatch.setenv("TEST_AUTOMATION_SECRET", secret)
    return receiver


def send_alert(urls, zone: str) -> None:
    send(urls["high"], [sample_envelope(event_type="intrusion_alert", payload={"zone": zone}).to_json()])


def consume_until(routing, tmp_path, condition, message: str) -> None:
    """Run a consumer until `condition` holds, then stop it."""
    consumer = consumer_in_process(routing, tmp_path)
    try:
        wait_until(condition, 30, message=message)
    finally:
        consumer.stop()


def handled_total(consumer):
    return sum(consumer.metrics.handled.labels(priority=p)._value.get() for p in ("high", "medium", "low"))


def query(tmp_path, sql):
    with duckdb.connect(str(tmp_path / "consumer.duckdb"), read_only=True) as con:
        return con.sql(sql).fetchall()


def test_high_priority_p99_stays_under_a_second_while_medium_and_low_back_up(priority, tmp_path):
    routing, urls = priority
    backlog = [sample_envelope(event_type="door_access", device_id=f"m-{i}").to_json() for i in range(8000)]
    send_all(aws_client("sqs"), {urls["medium"]: backlog[:4000], urls["low"]: backlog[4000:]})
    port = free_port()
    env = {
        **os.environ,
        "PIPELINE_CONSUMER_DB": str(tmp_path / "consumer.duckdb"),
        "PIPELINE_CONSUMER_METRICS_PORT": str(port),
        "PIPELINE_ARCHIVE_BUCKET": "",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.consumers"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "consumer.log", "wb"),
        start_new_session=True,
    )
    try:
        wait_until(lambda: scrape_handled(port, "medium") > 0, 60, message="the consumer to start on the backlog")
        sqs = aws_client("sqs")
        for i in range(100):
            send(urls["high"], [sample_envelope(event_type="intrusion_alert", device_id=f"h-{i}").to_json()], sqs)
            time.sleep(0.02)  # the load generator's pacing, not synchronisation
        wait_until(lambda: scrape_handled(port, "high") >= 100, 30, message="every high event to be handled")
        backed_up = queue_counts(urls["medium"])[0] + queue_counts(urls["low"])[0]
    finally:
        stop_process(proc)
    assert backed_up > 0, "medium/low should still be backed up when high is done"
    (count, p99) = query(
        tmp_path, "SELECT count(*), quantile_cont(latency_ms, 0.99) FROM events WHERE priority = 'high'"
    )[0]
    assert count == 100 and p99 < 1000, f"high p99 {p99:.0f} ms"


def scrape_handled(port, priority_name):
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except requests.RequestException:
        return 0
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "priority_events_handled"
        for s in f.samples
        if s.name.endswith("_total") and s.labels.get("priority") == priority_name
    )


def test_redelivered_event_is_handled_once_with_one_incident_and_one_signed_automation_call(
    priority, tmp_path, monkeypatch
):
    routing, urls = priority
    automation = automation_endpoint(monkeypatch)
    alert = sample_envelope(event_type="intrusion_alert", payload={"zone": "3"}).to_json()
    send(urls["high"], [alert])
    consumer = consumer_in_process(routing, tmp_path)
    try:
        wait_until(lambda: handled_total(consumer) == 1, 20, message="the first copy to be handled")
        send(urls["high"], [alert, alert])
        wait_until(
            lambda: consumer.metrics.duplicates.labels(priority="high")._value.get() == 2,
            20,
            message="the copies to be recognised",
        )
        wait_until(lambda: len(automation.accepted) == 1, 20, message="the automation webhook")
    finally:
        consumer.stop()
        automation.stop()
    assert query(tmp_path, "SELECT count(*) FROM events") == [(1,)]
    assert query(tmp_path, "SELECT count(*), min(webhook_status) FROM incidents") == [(1, "delivered")]
    assert automation.rejected_signatures == 0 and len(automation.requests) == 1


def test_the_same_event_id_from_two_sites_is_two_events_and_the_same_site_and_id_twice_is_one(priority, tmp_path):
    routing, urls = priority
    ours = sample_envelope(site_id="site-a", event_type="intrusion_alert", event_id="evt-1")
    theirs = sample_envelope(
        site_id="site-b", event_type="intrusion_alert", event_id="evt-1"
    )  # another site's publisher picks the same id
    send(urls["high"], [ours.to_json(), theirs.to_json(), ours.to_json()])
    consumer = consumer_in_process(routing, tmp_path)
    try:
        wait_until(
            lambda: (
                handled_total(consumer) == 2 and consumer.metrics.duplicates.labels(priority="high")._value.get() == 1
            ),
            20,
            message="two events and one duplicate",
        )
    finally:
        consumer.stop()
    assert query(tmp_path, "SELECT site_id, event_id FROM events ORDER BY site_id") == [
        ("site-a", "evt-1"),
        ("site-b", "evt-1"),
    ]
    assert query(tmp_path, "SELECT site_id, event_id FROM incidents ORDER BY site_id") == [
        ("site-a", "evt-1"),
        ("site-b", "evt-1"),
    ]


def test_device_status_keeps_the_latest_state_per_device(priority, tmp_path):
    from datetime import datetime, timedelta

    routing, urls = priority
    t0 = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)
    newer = sample_envelope(
        event_type="door_access", device_id="door-1", timestamp=t0 + timedelta(minutes=5), payload={"state": "open"}
    )
    older = sample_envelope(event_type="door_access", device_id="door-1", timestamp=t0, payload={"state": "closed"})
    send(urls["medium"], [newer.to_json()])
    consumer = consumer_in_process(routing, tmp_path)
    try:
        wait_until(lambda: handled_total(consumer) == 1, 20, message="the newer event")
        send(urls["medium"], [older.to_json()])
        wait_until(lambda: handled_total(consumer) == 2, 20, message="the late, older event")
    finally:
        consumer.stop()
    assert query(tmp_path, "SELECT device_id, state, last_seen FROM device_status") == [
        ("door-1", "open", newer.timestamp)
    ]


def test_invalid_message_is_kept_with_its_reason_and_does_not_block_the_queue(priority, tmp_path):
    routing, urls = priority
    good = sample_envelope(event_type="door_access")
    send(urls["medium"], ["{not json", good.to_json()])
    consumer = consumer_in_process(routing, tmp_path)
    try:
        wait_until(
            lambda: queue_counts(urls["medium"]) == (0, 0) and handled_total(consumer) == 1,
            20,
            message="both messages to leave the queue",
        )
        assert consumer.metrics.rejected.labels(priority="medium")._value.get() == 1
    finally:
        consumer.stop()
    assert query(tmp_path, "SELECT priority, split_part(reason, ':', 1) FROM rejected") == [("medium", "bad_json")]


def test_metrics_endpoint_and_handled_log_carry_queue_to_handled_latency_per_priority(priority, tmp_path):
    routing, urls = priority
    for name, kind in (("high", "intrusion_alert"), ("medium", "door_access"), ("low", "motion")):
        send(urls[name], [sample_envelope(event_type=kind).to_json()])
    port = free_port()
    consumer = consumer_in_process(
        routing, tmp_path, metrics_port=port, archive_bucket="events-archive", export_interval_s=0.5
    )
    try:
        wait_until(lambda: handled_total(consumer) == 3, 20, message="one event per priority")
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        consumer.stop()
    counts = {
        s.labels["priority"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "priority_queue_to_handled_seconds"
        for s in f.samples
        if s.name.endswith("_count")
    }
    assert counts == {"high": 1.0, "medium": 1.0, "low": 1.0}
    assert "consumer_lag" in text and "sqs_queue_depth" in text and "processing_error_rate" in text
    log = read_log(s3_filesystem(), "events-archive", "priority_handled")
    assert sorted(log.column("priority").to_pylist()) == ["high", "low", "medium"]
    assert set(log.schema.names) >= {
        "event_id",
        "event_type",
        "site_id",
        "priority",
        "enqueued_at",
        "handled_at",
        "latency_ms",
    }


def test_failed_automation_webhook_is_retried_with_backoff_until_delivered(priority, tmp_path, monkeypatch):
    routing, urls = priority  # retry_delays_s (1, 1, 2)
    automation = automation_endpoint(monkeypatch, fail_first=2)
    try:
        send_alert(urls, zone="3")
        consume_until(
            routing, tmp_path, lambda: len(automation.accepted) == 1, "the automation webhook after two failures"
        )
    finally:
        automation.stop()
    assert query(tmp_path, "SELECT webhook_status FROM incidents") == [("delivered",)]
    [webhook_id] = automation.accepted
    attempts = automation.attempts_for(webhook_id)
    assert [a.status for a in attempts] == [500, 500, 200] and all(a.verified for a in attempts)
    gaps = [later.at - earlier.at for earlier, later in zip(attempts, attempts[1:])]
    assert all(gap >= 0.9 for gap in gaps), gaps  # each retry waited out its delay


def test_automation_webhook_that_keeps_failing_is_given_up_with_the_count_and_error(priority, tmp_path, monkeypatch):
    routing, urls = priority
    automation = automation_endpoint(monkeypatch, always_fail=True)
    try:
        send_alert(urls, zone="4")
        consume_until(routing, tmp_path, lambda: len(automation.requests) == 4, "the first attempt and one per delay")
    finally:
        automation.stop()
    [(status,)] = query(tmp_path, "SELECT webhook_status FROM incidents")
    assert status.startswith("failed after 4 attempts: ") and "500" in status, status


def test_a_restarted_consumer_resumes_an_automation_webhook_it_was_retrying(priority, tmp_path, monkeypatch):
    routing, urls = priority
    automation = automation_endpoint(monkeypatch, always_fail=True)
    try:
        send_alert(urls, zone="5")
        consume_until(routing, tmp_path, lambda: len(automation.requests) == 2, "two failed attempts")
        [(status,)] = query(tmp_path, "SELECT webhook_status FROM incidents")
        assert status.startswith("retrying (attempt "), status
        automation.always_fail = False  # the automation endpoint is back while the consumer was down
        consume_until(routing, tmp_path, lambda: len(automation.accepted) == 1, "the resumed webhook")
    finally:
        automation.stop()
    assert query(tmp_path, "SELECT webhook_status FROM incidents") == [("delivered",)]
