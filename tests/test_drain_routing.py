"""The drain run's routing destinations: partners, priority queues, monitoring; failures, replay, kill -9."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import pytest

from devstack.processes import kill9
from pipeline.consumers.service import ConsumerSettings, PriorityConsumer
from pipeline.jobs import drain_events_job
from pipeline.replay import events_dlq_replay_job
from pipeline.resources import ArchiveStore, DrainSettings, RoutingSettings, SQSResource
from pipeline.routing.delivery import PartnerDelivery, PartnerQueues
from pipeline.stack import aws_client
from tests.conftest import PROJECT_ROOT, queue_counts, receive_all, sample_envelope, wait_until
from tests.helpers.routing import partner_routing
from tests.test_drain_and_archive import send_bodies
from tests.test_routing_config import routing_file


def resources(config_path):
    return {
        "sqs": SQSResource(events_queue="events"),
        "archive": ArchiveStore(bucket="events-archive"),
        "drain_settings": DrainSettings(window_seconds=10),
        "routing": RoutingSettings(config_path=str(config_path)),
    }


@pytest.fixture
def routed(tmp_path, aws, monkeypatch):
    """A routing config with one partner (a live, verifying receiver), provisioned on the test endpoint."""
    with partner_routing(
        tmp_path,
        monkeypatch,
        ["door_access", "intrusion_alert"],
        ["event_id", "event_type", "timestamp", "site_id", "payload.door.*"],
        priority={"rules": {"intrusion_alert": "high", "door_access": "medium"}, "default": "low"},
        monitoring={"event_types": ["device_heartbeat"]},
        automation={"rules": [{"event_type": "intrusion_alert", "incident": True}]},
    ) as routed:
        yield routed


def mixed_events(n):
    kinds = ["door_access", "intrusion_alert", "motion", "device_heartbeat"]
    return [sample_envelope(event_type=kinds[i % 4], device_id=f"dev-{i}") for i in range(n)]


def test_drain_run_hands_each_destination_its_share_before_deleting(aws, routed):
    routing, path, urls, _ = routed
    events = mixed_events(40)
    send_bodies(aws.provisioned.queues["events"], [e.to_json() for e in events])

    result = drain_events_job.execute_in_process(resources=resources(path))

    assert result.success and queue_counts(aws.provisioned.queues["events"]) == (0, 0)
    partner_msgs = receive_all(urls["partner-acme"], timeout=0.5)
    assert sorted(m["event_id"] for m in partner_msgs) == sorted(
        e.event_id for e in events if e.event_type in ("door_access", "intrusion_alert")
    )
    body = json.loads(partner_msgs[0]["body"])
    assert set(body) <= {
        "event_id",
        "event_type",
        "event_time",
        "location_id",
        "payload",
    } and "credential" not in json.dumps(body)
    per_priority = {
        p: len(receive_all(urls[routing.priority.queue_for(p)], timeout=0.5)) for p in ("high", "medium", "low")
    }
    assert per_priority == {"high": 10, "medium": 10, "low": 20}


def test_operational_events_are_pushed_to_loki_when_a_loki_url_is_configured(aws, routed, monkeypatch):
    _, path, _, _ = routed
    pushed = []

    class Loki(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            pushed.append((self.path, json.loads(self.rfile.read(int(self.headers["content-length"])))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Loki)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIPELINE_LOKI_URL", f"http://127.0.0.1:{server.server_address[1]}")
    events = mixed_events(8)
    send_bodies(aws.provisioned.queues["events"], [e.to_json() for e in events])
    try:
        assert drain_events_job.execute_in_process(resources=resources(path)).success
    finally:
        server.shutdown()
    assert [p for p, _ in pushed] == ["/loki/api/v1/push"]
    lines = [json.loads(v[1])["event_id"] for s in pushed[0][1]["streams"] for v in s["values"]]
    assert sorted(lines) == sorted(e.event_id for e in events if e.event_type == "device_heartbeat")


def test_failed_destination_keeps_the_window_and_replay_reports_why_it_failed(aws, routed, tmp_path):
    routing, path, _, _ = routed
    (tmp_path / "broken").mkdir()
    broken = routing_file(
        tmp_path / "broken",
        [],
        priority={"queues": {"high": "no-such-queue", "medium": "no-such-queue", "low": "no-such-queue"}},
    )
    events_url, dlq_url = aws.provisioned.queues["events"], aws.provisioned.queues["events-dlq"]
    aws_client("sqs").set_queue_attributes(QueueUrl=events_url, Attributes={"VisibilityTimeout": "1"})
    events = mixed_events(6)
    send_bodies(events_url, [e.to_json() for e in events])

    first = drain_events_job.execute_in_process(resources=resources(broken), raise_on_error=False)
    assert not first.success
    assert queue_counts(events_url)[0] + queue_counts(events_url)[1] == 6, "nothing deleted after a failed destination"

    def dead_lettered():
        drain_events_job.execute_in_process(resources=resources(broken), raise_on_error=False)
        return queue_counts(dlq_url)[0] == 6

    wait_until(dead_lettered, 60, interval=1.0, message="the window to reach events-dlq after 3 receives")

    replay = events_dlq_replay_job.execute_in_process(resources=resources(path))
    assert replay.success and replay.output_for_node("replay_events_dlq_into_events") == 6
    report = [e for e in replay.all_events if e.event_type_value == "STEP_OUTPUT"][0].event_specific_data.metadata
    assert all("route_to_priority_queues" in m["reason"] for m in report["messages"].value)
    assert queue_counts(dlq_url) == (0, 0)
    assert sorted(b["event_id"] for b in receive_all(events_url, timeout=2.5)) == sorted(e.event_id for e in events)


RUNNER = """
import sys
import threading

import pipeline.drain
from pipeline.jobs import drain_events_job

# The kill must land before the delete however slow the machine is: a run that reaches its delete
# op waits there, so the test's kill -9 always finds the window routed (in part) but not deleted.
pipeline.drain.delete_messages = lambda *args, **kwargs: threading.Event().wait()
from pipeline.resources import ArchiveStore, DrainSettings, RoutingSettings, SQSResource
result = drain_events_job.execute_in_process(resources={
    "sqs": SQSResource(events_queue="events"), "archive": ArchiveStore(bucket="events-archive"),
    "drain_settings": DrainSettings(window_seconds=30), "routing": RoutingSettings()})
sys.exit(0 if result.success else 1)
"""


def test_drain_run_killed_mid_window_loses_nothing_and_duplicates_no_side_effect(aws, routed, tmp_path):
    routing, path, urls, receiver = routed
    events_url = aws.provisioned.queues["events"]
    sqs = aws_client("sqs")
    sqs.set_queue_attributes(QueueUrl=events_url, Attributes={"VisibilityTimeout": "4"})
    events = mixed_events(600)
    send_bodies(events_url, [e.to_json() for e in events])
    routed_urls = [urls["partner-acme"]] + [urls[routing.priority.queue_for(p)] for p in ("high", "medium", "low")]

    child = subprocess.Popen(
        [sys.executable, "-c", RUNNER],
        cwd=PROJECT_ROOT,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "drain.log", "wb"),
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: queue_counts(routed_urls[0])[0] > 0 or child.poll() is not None,
            90,
            interval=0.01,
            message="the drain run to start routing",
        )
    finally:
        kill9(child)
    assert child.returncode == -9, (
        f"the drain run finished before it could be killed:\n{(tmp_path / 'drain.log').read_text()[-2000:]}"
    )
    routed_before = sum(queue_counts(u)[0] for u in routed_urls)
    assert routed_before > 0, "killed after destinations had accepted part of the window"
    assert sum(queue_counts(events_url)) == 600, "nothing was deleted from SQS by the killed run"

    # The window comes back after the visibility timeout; drains run until the queue is empty.
    def drained():
        assert drain_events_job.execute_in_process(resources=resources(path)).success
        return queue_counts(events_url) == (0, 0)

    wait_until(drained, 120, interval=0.5, message="later drain runs to take the redelivered window")

    consumer = PriorityConsumer(
        routing, aws_client("sqs"), ConsumerSettings(db_path=str(tmp_path / "consumer.duckdb"))
    ).start()
    partner = routing.partner("acme")
    queues = PartnerQueues(urls[partner.queue_name], urls[partner.dlq_name])
    stats = PartnerDelivery(partner, aws_client("sqs"), queues, routing.retry_delays_s, None).run(max_seconds=60)
    handled = lambda: sum(consumer.metrics.handled.labels(priority=p)._value.get() for p in ("high", "medium", "low"))  # noqa: E731
    try:
        wait_until(lambda: handled() >= 600, 90, message="the priority consumer to handle every event")
        wait_until(
            lambda: all(queue_counts(urls[routing.priority.queue_for(p)]) == (0, 0) for p in ("high", "medium", "low")),
            30,
            message="priority queues to empty",
        )
    finally:
        consumer.stop()
    duplicate_work = receiver.duplicates + sum(
        consumer.metrics.duplicates.labels(priority=p)._value.get() for p in ("high", "medium", "low")
    )
    assert duplicate_work > 0, "the kill made the redelivered window route some events twice"

    subscribed = {e.dedupe_id for e in events if e.event_type in partner.subscriptions}
    assert set(receiver.accepted) == subscribed and stats.delivered >= len(subscribed)
    with duckdb.connect(str(tmp_path / "consumer.duckdb"), read_only=True) as con:
        assert con.sql("SELECT count(*), count(DISTINCT event_id) FROM events").fetchall() == [(600, 600)]
        assert con.sql("SELECT count(*) FROM incidents").fetchall() == [(150,)]
        assert sorted(r[0] for r in con.sql("SELECT event_id FROM events").fetchall()) == sorted(
            e.event_id for e in events
        )
