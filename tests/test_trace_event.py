"""`python -m pipeline.trace <event_id>` shows one event's path from each stage's own durable record.

The records are written by the pipeline's real writers (landing files, compaction, the delivery and
priority logs) into the local S3; the edge stage asks a real edge service through its admin API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from edge_bridge.envelope import Envelope
from pipeline.archive import compact_hour, hour_key, write_landing
from pipeline.routing.logs import DELIVERY_ATTEMPT_SCHEMA, PRIORITY_HANDLED_SCHEMA, write_log
from pipeline.stack import aws_client, s3_filesystem
from pipeline.trace import trace_event, uuid7_time
from tests.conftest import PROJECT_ROOT, publish, sample_envelope, wait_until

BUCKET = "events-archive"


def run_trace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.trace", *args], cwd=PROJECT_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120)


def land_and_archive(events: list[Envelope], run_id: str) -> None:
    filesystem = s3_filesystem()
    hours = write_landing(filesystem, BUCKET, "landing", events, run_id, datetime.now(timezone.utc))
    for hour in hours:
        compact_hour(filesystem, BUCKET, "landing", hour)


@pytest.fixture
def routed_event(aws) -> Envelope:
    """One intrusion alert as the pipeline leaves it: drained twice, archived, two partner attempts, handled high."""
    now = datetime.now(timezone.utc)
    event = sample_envelope(event_type="intrusion_alert", timestamp=now - timedelta(seconds=5), payload={"zone": "3"})
    other = sample_envelope(event_type="intrusion_alert", device_id="door-9", timestamp=now - timedelta(seconds=4))
    land_and_archive([event, other], "run-first")
    land_and_archive([event], "run-redelivered")
    filesystem = s3_filesystem()
    attempt = {"event_id": event.event_id, "partner": "security-monitoring", "latency_ms": 12.0}
    write_log(filesystem, BUCKET, "delivery_attempts", DELIVERY_ATTEMPT_SCHEMA, [
        {**attempt, "attempt": 1, "attempted_at": now, "status_code": 503, "outcome": "failed", "error": "HTTP 503"},
        {**attempt, "attempt": 2, "attempted_at": now + timedelta(seconds=1), "status_code": 200, "outcome": "delivered", "error": None},
        {**attempt, "event_id": other.event_id, "attempt": 1, "attempted_at": now, "status_code": 200, "outcome": "delivered", "error": None},
    ], "attempted_at")
    write_log(filesystem, BUCKET, "priority_handled", PRIORITY_HANDLED_SCHEMA, [
        {"event_id": event.event_id, "event_type": "intrusion_alert", "site_id": "site-123", "priority": "high", "enqueued_at": now, "handled_at": now + timedelta(milliseconds=40), "latency_ms": 40.0},
    ], "handled_at")
    return event


def test_trace_shows_the_drain_runs_partner_attempts_priority_and_archive_file_of_an_event(routed_event):
    result = run_trace(routed_event.event_id, "--json")

    assert result.returncode == 0, result.stderr
    stages = {s["name"]: s for s in json.loads(result.stdout)["stages"]}
    assert sorted(r["drain_run"] for r in stages["sqs"]["records"]) == ["run-first", "run-redelivered"]
    assert [(r["attempt"], r["status_code"], r["outcome"]) for r in stages["partners"]["records"]] == [(1, 503, "failed"), (2, 200, "delivered")]
    assert [r["priority"] for r in stages["priority"]["records"]] == ["high"]
    [archived] = stages["archive"]["records"]
    assert archived["partition"] == hour_key(routed_event.timestamp)
    assert archived["file"].startswith(f"s3://{BUCKET}/{routed_event.timestamp:year=%Y/month=%m/day=%d/hour=%H}/events_")


def test_trace_prints_one_readable_line_per_stage(routed_event):
    result = run_trace(routed_event.event_id)

    assert result.returncode == 0, result.stderr
    assert "security-monitoring: attempt 2 at" in result.stdout and "-> 200 delivered" in result.stdout
    assert "high queue: handled" in result.stdout
    assert "received 2 times" in result.stdout
    assert f"partition {hour_key(routed_event.timestamp)}: s3://{BUCKET}/" in result.stdout


def test_an_event_archived_far_from_its_id_time_is_still_found_by_a_full_scan(aws):
    late = sample_envelope(timestamp=datetime(2024, 1, 15, 10, 30, tzinfo=timezone.utc))
    land_and_archive([late], "run-late")

    trace = trace_event(late.event_id, filesystem=s3_filesystem(), bucket=BUCKET)

    assert trace.around is not None and trace.around.year > 2024
    assert trace.stage("archive").records[0]["partition"] == "2024-01-15-10:00"


def test_an_unknown_event_is_found_nowhere_and_the_command_says_so(aws):
    result = run_trace(sample_envelope().event_id)

    assert result.returncode == 1
    assert "no drain run received it" in result.stdout and "not archived" in result.stdout


def test_an_event_in_events_dlq_is_shown_and_left_in_place(aws):
    event = sample_envelope()
    sqs = aws_client("sqs")
    dlq = aws.provisioned.queues["events-dlq"]
    sqs.send_message(QueueUrl=dlq, MessageBody=event.to_json())
    sqs.send_message(QueueUrl=dlq, MessageBody=sample_envelope(device_id="other").to_json())

    trace = trace_event(event.event_id, filesystem=s3_filesystem(), bucket=BUCKET, sqs=sqs, dlq_url=dlq)

    assert trace.stage("sqs").found and "now in events-dlq" in " ".join(trace.stage("sqs").lines)
    attributes = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "2", "the peek must leave every message visible"


def test_an_event_in_an_edge_dlq_is_shown_with_its_attempts_and_last_error(edge_factory, mosquitto, aws):
    sqs = aws_client("sqs")
    sqs.set_queue_attributes(QueueUrl=aws.provisioned.queues["events"], Attributes={"MaximumMessageSize": "1024"})
    edge = edge_factory(EDGE_RETRY_BACKOFF_S="0.1")
    poison = sample_envelope(payload={"pad": "x" * 2000})
    publish(mosquitto.port, poison.topic, [poison.to_json()])

    def traced_in_edge_dlq():
        stage = trace_event(poison.event_id, filesystem=s3_filesystem(), bucket=BUCKET, edge_admin_urls=[edge.admin_url]).stage("edge")
        return stage if stage.found else None

    stage = wait_until(traced_in_edge_dlq, 30, interval=0.5, message="the refused event in the edge DLQ trace")
    assert stage.records[0]["attempts"] == 3
    assert "in the edge DLQ after 3 SQS attempts" in stage.lines[0]


def test_an_unreachable_edge_is_reported_not_raised(aws):
    from devstack.processes import free_port

    url = f"http://127.0.0.1:{free_port()}"
    stage = trace_event(sample_envelope().event_id, filesystem=s3_filesystem(), bucket=BUCKET, edge_admin_urls=[url]).stage("edge")

    assert not stage.found and "edge admin API unreachable" in stage.lines[0]


def test_uuid7_ids_carry_their_creation_time_and_other_ids_none():
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert before <= uuid7_time(sample_envelope().event_id) <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert uuid7_time("6f1b2c1e-9a4b-4c7e-8e2a-2b1c3d4e5f60") is None
    assert uuid7_time("not-a-uuid") is None


def test_a_site_qualified_id_traces_only_that_sites_event_while_a_bare_id_shows_every_sites(aws):
    now = datetime.now(timezone.utc)
    ours = sample_envelope(site_id="site-a", event_id="door-event-1", timestamp=now - timedelta(seconds=5))
    theirs = sample_envelope(site_id="site-b", event_id="door-event-1", device_id="door-9", timestamp=now - timedelta(seconds=5))
    land_and_archive([ours, theirs], "run-both")

    result = run_trace("site-b/door-event-1", "--json")

    assert result.returncode == 0, result.stderr
    traced = json.loads(result.stdout)
    stages = {s["name"]: s for s in traced["stages"]}
    assert traced["site_id"] == "site-b" and traced["event_id"] == "door-event-1"
    assert [r["site_id"] for r in stages["archive"]["records"]] == ["site-b"]
    assert [r["site_id"] for r in stages["sqs"]["records"]] == ["site-b"]
    bare = trace_event("door-event-1", filesystem=s3_filesystem(), bucket=BUCKET)
    assert sorted(r["site_id"] for r in bare.stage("archive").records) == ["site-a", "site-b"]
    assert not any("archived 2 times" in line for line in bare.stage("archive").lines), "two sites' events are not one event archived twice"
