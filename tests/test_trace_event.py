"""`python -m pipeline.trace <event_id>` finds an event in every place it can be, from each place's own record.

Each place is filled for real: the forwarder and the edge service quarantine what they refuse, the edge
spills to its retry log while SQS is cut, drain runs land, route and quarantine, delivery runs log
attempts and set poison aside in the partner DLQ, SQS itself redrives a message no consumer commits,
the priority consumer (a process of its own) writes its tables and its handling log, compaction
archives. The trace then has to name the place, and leave every queue as it found it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from devstack.processes import stop_process
from devstack.tcp_proxy import TcpProxy
from edge_bridge.envelope import Envelope
from edge_bridge.forwarder import Forwarder
from pipeline.archive import compact_hour, hour_key, write_landing
from pipeline.jobs import drain_events_job
from pipeline.routing.delivery import PartnerDelivery, PartnerQueues
from pipeline.routing.logs import DELIVERY_ATTEMPT_SCHEMA, PRIORITY_HANDLED_SCHEMA, AttemptLog, write_log
from pipeline.stack import aws_client, s3_filesystem
from pipeline.trace import QueueSet, known_queues, trace_event, uuid7_time
from tests.conftest import PROJECT_ROOT, publish, queue_counts, sample_envelope, wait_until
from tests.test_drain_and_archive import send_bodies
from tests.test_drain_routing import resources, routed  # noqa: F401 - a fixture

BUCKET = "events-archive"


def run_trace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.trace", *args],
        cwd=PROJECT_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


def land_and_archive(events: list[Envelope], run_id: str) -> None:
    filesystem = s3_filesystem()
    hours = write_landing(filesystem, BUCKET, "landing", events, run_id, datetime.now(UTC))
    for hour in hours:
        compact_hour(filesystem, BUCKET, "landing", hour)


@pytest.fixture
def routed_event(aws) -> Envelope:
    """One intrusion alert as the pipeline leaves it: drained twice, archived, two partner attempts, handled high."""
    now = datetime.now(UTC)
    event = sample_envelope(event_type="intrusion_alert", timestamp=now - timedelta(seconds=5), payload={"zone": "3"})
    other = sample_envelope(event_type="intrusion_alert", device_id="door-9", timestamp=now - timedelta(seconds=4))
    land_and_archive([event, other], "run-first")
    land_and_archive([event], "run-redelivered")
    filesystem = s3_filesystem()
    attempt = {"event_id": event.event_id, "partner": "security-monitoring", "latency_ms": 12.0}
    write_log(
        filesystem,
        BUCKET,
        "delivery_attempts",
        DELIVERY_ATTEMPT_SCHEMA,
        [
            {
                **attempt,
                "attempt": 1,
                "attempted_at": now,
                "status_code": 503,
                "outcome": "failed",
                "error": "HTTP 503",
            },
            {
                **attempt,
                "attempt": 2,
                "attempted_at": now + timedelta(seconds=1),
                "status_code": 200,
                "outcome": "delivered",
                "error": None,
            },
            {
                **attempt,
                "event_id": other.event_id,
                "attempt": 1,
                "attempted_at": now,
                "status_code": 200,
                "outcome": "delivered",
                "error": None,
            },
        ],
        "attempted_at",
    )
    write_log(
        filesystem,
        BUCKET,
        "priority_handled",
        PRIORITY_HANDLED_SCHEMA,
        [
            {
                "event_id": event.event_id,
                "event_type": "intrusion_alert",
                "site_id": "site-123",
                "priority": "high",
                "enqueued_at": now,
                "handled_at": now + timedelta(milliseconds=40),
                "latency_ms": 40.0,
            },
        ],
        "handled_at",
    )
    return event


def test_trace_shows_the_drain_runs_partner_attempts_priority_and_archive_file_of_an_event(routed_event):
    result = run_trace(routed_event.event_id, "--json")

    assert result.returncode == 0, result.stderr
    stages = {s["name"]: s for s in json.loads(result.stdout)["stages"]}
    assert sorted(r["drain_run"] for r in stages["landing"]["records"]) == ["run-first", "run-redelivered"]
    assert [(r["attempt"], r["status_code"], r["outcome"]) for r in stages["partner-attempts"]["records"]] == [
        (1, 503, "failed"),
        (2, 200, "delivered"),
    ]
    assert [r["priority"] for r in stages["consumer-log"]["records"]] == ["high"]
    [archived] = stages["archive"]["records"]
    assert archived["partition"] == hour_key(routed_event.timestamp)
    assert archived["file"].startswith(
        f"s3://{BUCKET}/{routed_event.timestamp:year=%Y/month=%m/day=%d/hour=%H}/events_"
    )


def test_trace_prints_one_readable_line_per_stage(routed_event):
    result = run_trace(routed_event.event_id)

    assert result.returncode == 0, result.stderr
    assert "security-monitoring: attempt 2 at" in result.stdout and "-> 200 delivered" in result.stdout
    assert "high queue: handled" in result.stdout
    assert "received 2 times" in result.stdout
    assert f"partition {hour_key(routed_event.timestamp)}: s3://{BUCKET}/" in result.stdout


def test_an_event_archived_far_from_its_id_time_is_still_found_by_a_full_scan(aws):
    late = sample_envelope(timestamp=datetime(2024, 1, 15, 10, 30, tzinfo=UTC))
    land_and_archive([late], "run-late")

    trace = trace_event(late.event_id, filesystem=s3_filesystem(), bucket=BUCKET)

    assert trace.around is not None and trace.around.year > 2024
    assert trace.stage("archive").records[0]["partition"] == "2024-01-15-10:00"


def test_an_unknown_event_is_found_nowhere_and_the_command_says_so(aws):
    result = run_trace(sample_envelope().event_id)

    assert result.returncode == 1
    assert "no drain run received it" in result.stdout and "not archived" in result.stdout
    assert (
        "not in events (looked at 0 of ~0), events-dlq (looked at 0 of ~0); a scan looks at up to 1000 messages a queue"
        in result.stdout
    )


def test_an_event_in_events_dlq_is_shown_and_left_in_place(aws):
    event = sample_envelope()
    sqs = aws_client("sqs")
    dlq = aws.provisioned.queues["events-dlq"]
    sqs.send_message(QueueUrl=dlq, MessageBody=event.to_json())
    sqs.send_message(QueueUrl=dlq, MessageBody=sample_envelope(device_id="other").to_json())

    trace = trace_event(
        event.event_id, filesystem=s3_filesystem(), bucket=BUCKET, sqs=sqs, queues=QueueSet(events={"events-dlq": dlq})
    )

    stage = trace.stage("events-queue")
    assert (
        stage.found
        and "waiting in events-dlq" in stage.lines[0]
        and "the 02:00 events-dlq replay moves it back (looked at 2 of ~2)" in stage.lines[0]
    )
    assert queue_counts(dlq) == (2, 0), "the peek must leave every message visible"


def test_an_event_in_an_edge_dlq_is_shown_with_its_attempts_and_last_error(edge_factory, mosquitto, aws):
    sqs = aws_client("sqs")
    sqs.set_queue_attributes(QueueUrl=aws.provisioned.queues["events"], Attributes={"MaximumMessageSize": "1024"})
    edge = edge_factory(EDGE_RETRY_BACKOFF_S="0.1")
    poison = sample_envelope(payload={"pad": "x" * 2000})
    publish(mosquitto.port, poison.topic, [poison.to_json()])

    def traced_in_edge_dlq():
        stage = trace_event(
            poison.event_id, filesystem=s3_filesystem(), bucket=BUCKET, edge_admin_urls=[edge.admin_url]
        ).stage("retry-log")
        return stage if [r["place"] for r in stage.records] == ["dlq"] else None

    stage = wait_until(
        traced_in_edge_dlq, 30, interval=0.5, message="the refused event in the edge DLQ trace, and no longer pending"
    )
    assert stage.records[0]["attempts"] == 3
    assert "in the edge DLQ after 3 SQS attempts" in stage.lines[0]


def test_an_unreachable_edge_is_reported_not_raised(aws):
    from devstack.processes import free_port

    url = f"http://127.0.0.1:{free_port()}"
    stage = trace_event(
        sample_envelope().event_id, filesystem=s3_filesystem(), bucket=BUCKET, edge_admin_urls=[url]
    ).stage("retry-log")

    assert not stage.found and "edge admin API unreachable" in stage.lines[0]


def test_uuid7_ids_carry_their_creation_time_and_other_ids_none():
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert before <= uuid7_time(sample_envelope().event_id) <= datetime.now(UTC) + timedelta(seconds=1)
    assert uuid7_time("6f1b2c1e-9a4b-4c7e-8e2a-2b1c3d4e5f60") is None
    assert uuid7_time("not-a-uuid") is None


def test_a_site_qualified_id_traces_only_that_sites_event_while_a_bare_id_shows_every_sites(aws):
    now = datetime.now(UTC)
    ours = sample_envelope(site_id="site-a", event_id="door-event-1", timestamp=now - timedelta(seconds=5))
    theirs = sample_envelope(
        site_id="site-b", event_id="door-event-1", device_id="door-9", timestamp=now - timedelta(seconds=5)
    )
    land_and_archive([ours, theirs], "run-both")

    result = run_trace("site-b/door-event-1", "--json")

    assert result.returncode == 0, result.stderr
    traced = json.loads(result.stdout)
    stages = {s["name"]: s for s in traced["stages"]}
    assert traced["site_id"] == "site-b" and traced["event_id"] == "door-event-1"
    assert [r["site_id"] for r in stages["archive"]["records"]] == ["site-b"]
    assert [r["site_id"] for r in stages["landing"]["records"]] == ["site-b"]
    bare = trace_event("door-event-1", filesystem=s3_filesystem(), bucket=BUCKET)
    assert sorted(r["site_id"] for r in bare.stage("archive").records) == ["site-a", "site-b"]
    assert not any("archived 2 times" in line for line in bare.stage("archive").lines), (
        "two sites' events are not one event archived twice"
    )


# --- every place, filled for real ----------------------------------------------------------------
def trace_everywhere(event: Envelope, **places):
    """The trace as an operator runs it: every queue of the stack and routing configs, the cloud quarantine."""
    sqs = aws_client("sqs")
    return trace_event(
        event.event_id,
        site_id=event.site_id,
        filesystem=s3_filesystem(),
        bucket=BUCKET,
        sqs=sqs,
        queues=known_queues(sqs),
        s3=aws_client("s3"),
        **places,
    )


def found_in(trace) -> list[str]:
    return [stage.name for stage in trace.stages if stage.found]


def with_schema(event: Envelope, version: str) -> str:
    """The event as a producer on a schema major the pipeline does not know would send it."""
    body = json.loads(event.to_json())
    body["schema_version"] = version
    return json.dumps(body)


def run_consumer(tmp_path, db) -> subprocess.Popen:
    """`python -m pipeline.consumers` as its own process, holding its DuckDB file as in production."""
    env = {
        **os.environ,
        "PIPELINE_CONSUMER_DB": str(db),
        "PIPELINE_CONSUMER_METRICS_PORT": "",
        "PIPELINE_ARCHIVE_BUCKET": BUCKET,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.consumers"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "consumer.log", "ab"),
        start_new_session=True,
    )


def test_an_event_is_found_in_each_place_it_waits_on_its_way_through_the_cloud_and_every_queue_is_left_as_it_was(
    aws, routed, tmp_path
):  # noqa: F811
    routing, path, urls, receiver = routed
    event = sample_envelope(
        event_type="intrusion_alert", timestamp=datetime.now(UTC) - timedelta(seconds=5), payload={"zone": "3"}
    )
    others = [sample_envelope(event_type="door_access", device_id=f"door-{i}") for i in range(4)]
    events_url = aws.provisioned.queues["events"]
    send_bodies(events_url, [e.to_json() for e in [*others[:2], event, *others[2:]]])
    db = tmp_path / "consumer.duckdb"

    queued = trace_everywhere(event, consumer_db=str(db))
    assert found_in(queued) == ["events-queue"]
    assert "waiting in events for a drain run" in queued.stage("events-queue").lines[0]
    assert queue_counts(events_url) == (5, 0), "the peek made every message visible again"

    assert drain_events_job.execute_in_process(resources=resources(path)).success
    routed_now = trace_everywhere(event, consumer_db=str(db))
    assert found_in(routed_now) == ["landing", "partner-queue", "priority-queue"]
    assert [r["queue"] for r in routed_now.stage("partner-queue").records] == ["partner-acme"]
    assert [r["queue"] for r in routed_now.stage("priority-queue").records] == [routing.priority.queue_for("high")]
    assert queue_counts(urls["partner-acme"]) == (5, 0), "the peek made every message visible again"

    partner = routing.partner("acme")
    log = AttemptLog(s3_filesystem(), BUCKET)
    PartnerDelivery(
        partner,
        aws_client("sqs"),
        PartnerQueues(urls[partner.queue_name], urls[partner.dlq_name]),
        routing.retry_delays_s,
        log,
    ).run(max_seconds=60)
    consumer = run_consumer(tmp_path, db)
    try:
        handled = wait_until(
            lambda: (t := trace_everywhere(event, consumer_db=str(db))).stage("consumer-db").found and t,
            60,
            interval=0.5,
            message="the consumer's tables to hold the event",
        )
        assert "a copy: the consumer holds the file" in handled.stage("consumer-db").lines[-1]
    finally:
        stop_process(consumer)  # SIGTERM: it finishes its batches and exports its handling log
    compact_hour(s3_filesystem(), BUCKET, "landing", hour_key(event.timestamp))

    done = trace_everywhere(event, consumer_db=str(db))
    assert found_in(done) == ["landing", "partner-attempts", "consumer-log", "consumer-db", "archive"]
    assert [(r["partner"], r["outcome"]) for r in done.stage("partner-attempts").records] == [("acme", "delivered")]
    assert sorted(r["table"] for r in done.stage("consumer-db").records) == ["events", "incidents"]
    assert done.stage("consumer-db").lines[-1] == f"read {db}"
    assert all(queue_counts(url) == (0, 0) for url in urls.values())


def test_a_device_message_the_forwarder_refused_is_found_in_its_quarantine_by_the_devices_own_id(
    aws, mosquitto, tmp_path
):
    state = tmp_path / "forwarder"
    forwarder = Forwarder.connect("site-a", "127.0.0.1", mosquitto.port, state, known_devices={"idp-door-1"})
    try:
        raw = {
            "eventId": "idp-evt-4711",
            "occurredAt": "2024-01-15T10:30:00Z",
            "door": {"id": "door-9"},
            "credential": {"type": "card", "id": "c-1"},
            "decision": "granted",
        }
        assert forwarder.forward("idp", "idp/events", json.dumps(raw).encode()) is None
    finally:
        forwarder.close()

    trace = trace_event("idp-evt-4711", filesystem=s3_filesystem(), bucket=BUCKET, forwarder_dirs=[str(state)])

    [record] = trace.stage("forwarder").records
    assert (record["site_id"], record["reason"], record["line"]) == ("site-a", "unknown_device", 1)
    assert "the device message never became an envelope" in trace.stage("forwarder").lines[0]
    other_site = trace_event(
        "idp-evt-4711", site_id="site-b", filesystem=s3_filesystem(), bucket=BUCKET, forwarder_dirs=[str(state)]
    )
    assert not other_site.stage("forwarder").found


def test_an_envelope_the_edge_service_quarantined_is_found_there_with_its_reason(edge_factory, mosquitto, aws):
    edge = edge_factory()
    refused = sample_envelope(site_id="site-123")
    good = sample_envelope(site_id="site-123", device_id="door-2")
    publish(mosquitto.port, refused.topic, [with_schema(refused, "2.0"), good.to_json()])
    wait_until(
        lambda: edge.admin().status()["jobs_pending"] == 0 and queue_counts(aws.provisioned.queues["events"])[0] >= 1,
        30,
        message="the good event in SQS",
    )

    stage = wait_until(
        lambda: (s := trace_everywhere(refused, edge_admin_urls=[edge.admin_url]).stage("edge-quarantine")).found and s,
        30,
        interval=0.5,
        message="the quarantined envelope",
    )

    [entry] = stage.records
    assert entry["reason"] == "unsupported_major" and entry["match"] == "envelope" and not entry["released"]
    assert (
        entry["ref"].startswith("quarantine.jsonl:") and "held: `edge_bridge.cli quarantine release`" in stage.lines[0]
    )
    assert not trace_everywhere(good, edge_admin_urls=[edge.admin_url]).stage("edge-quarantine").found


def test_an_event_spilled_to_the_edge_retry_log_while_sqs_is_cut_is_found_pending(edge_factory, mosquitto, aws):
    proxy = TcpProxy(aws.port)  # closed: SQS is cut
    edge = edge_factory(sqs_endpoint=proxy.url)
    event = sample_envelope()
    publish(mosquitto.port, event.topic, [event.to_json()])
    wait_until(lambda: edge.admin().status()["jobs_pending"] == 1, 30, message="the event in the retry log")

    trace = trace_everywhere(event, edge_admin_urls=[edge.admin_url])

    assert found_in(trace) == ["retry-log"]
    [job] = trace.stage("retry-log").records
    assert job["place"] == "pending" and job["site_id"] == event.site_id
    assert trace.stage("retry-log").lines[0].startswith("edge site-local: pending in the retry log since ")


def test_an_event_the_drain_quarantined_is_found_in_the_cloud_quarantine(aws, routed, tmp_path):  # noqa: F811
    _, path, _, _ = routed
    event = sample_envelope()
    send_bodies(
        aws.provisioned.queues["events"], [with_schema(event, "2.0"), sample_envelope(device_id="door-2").to_json()]
    )
    assert drain_events_job.execute_in_process(resources=resources(path)).success

    trace = trace_everywhere(event)

    assert found_in(trace) == ["cloud-quarantine"]
    [record] = trace.stage("cloud-quarantine").records
    assert (record["stage"], record["reason"], record["site_id"], record["released"]) == (
        "validate_and_dedupe",
        "unsupported_major",
        event.site_id,
        None,
    )
    assert "python -m pipeline.quarantine release" in trace.stage("cloud-quarantine").lines[0]


def test_a_partner_message_set_aside_as_poison_is_found_in_the_partner_dlq_with_its_reason(aws, routed):  # noqa: F811
    routing, _, urls, _ = routed
    event = sample_envelope(event_type="door_access")
    poison = json.dumps({"event_id": event.event_id, "site_id": event.site_id})  # no body to send
    aws_client("sqs").send_message(QueueUrl=urls["partner-acme"], MessageBody=poison)
    partner = routing.partner("acme")
    stats = PartnerDelivery(
        partner,
        aws_client("sqs"),
        PartnerQueues(urls[partner.queue_name], urls[partner.dlq_name]),
        routing.retry_delays_s,
        None,
    ).run(max_seconds=30)
    assert stats.malformed == 1

    trace = trace_everywhere(event)

    assert found_in(trace) == ["partner-queue"]
    [record] = trace.stage("partner-queue").records
    assert record["queue"] == "partner-acme-dlq" and record["attributes"]["failure_reason"] == "missing_field"
    assert "set aside in partner-acme-dlq: missing_field: body" in trace.stage("partner-queue").lines[0]
    assert trace.stage("partner-queue").lines[1].startswith("not in partner-acme (looked at 0 of ~0)")
    assert queue_counts(urls["partner-acme-dlq"]) == (1, 0)


def test_a_message_no_consumer_commits_is_found_in_its_priority_dlq_after_sqs_redrove_it(aws, routed):  # noqa: F811
    routing, _, urls, _ = routed
    high, high_dlq = routing.priority.queue_for("high"), routing.priority.queue_for("high") + "-dlq"
    event = sample_envelope(event_type="intrusion_alert")
    sqs = aws_client("sqs")
    sqs.send_message(QueueUrl=urls[high], MessageBody=event.to_json())

    def redriven() -> bool:  # a consumer that receives it and never deletes it, until SQS moves it
        sqs.receive_message(QueueUrl=urls[high], MaxNumberOfMessages=1, VisibilityTimeout=0, WaitTimeSeconds=0)
        return queue_counts(urls[high_dlq])[0] == 1

    wait_until(redriven, 30, interval=0.05, message="SQS to move the message to the DLQ")

    trace = trace_everywhere(event)

    [record] = trace.stage("priority-queue").records
    assert record["queue"] == high_dlq
    assert f"in {high_dlq}: the consumer failed to commit it" in " ".join(trace.stage("priority-queue").lines)


def test_a_message_the_consumer_rejected_is_found_in_its_rejected_table(aws, routed, tmp_path):  # noqa: F811
    routing, _, urls, _ = routed
    event = sample_envelope(event_type="door_access")
    aws_client("sqs").send_message(
        QueueUrl=urls[routing.priority.queue_for("medium")], MessageBody=with_schema(event, "2.0")
    )
    db = tmp_path / "consumer.duckdb"
    consumer = run_consumer(tmp_path, db)
    try:
        stage = wait_until(
            lambda: (s := trace_everywhere(event, consumer_db=str(db)).stage("consumer-db")).found and s,
            60,
            interval=0.5,
            message="the rejected row",
        )
    finally:
        stop_process(consumer)

    [record] = stage.records
    assert record["table"] == "rejected" and record["reason"].startswith("unsupported_major")
    assert "rejected from the medium queue" in stage.lines[0]


def test_a_queue_scan_is_bounded_and_says_how_many_messages_it_looked_at(aws):
    url = aws.provisioned.queues["events"]
    send_bodies(url, [sample_envelope(device_id=f"door-{i}").to_json() for i in range(30)])

    result = run_trace(sample_envelope(device_id="elsewhere").event_id, "--peek-limit", "10")

    assert result.returncode == 1
    assert (
        "not in events (looked at 10 of ~30, the limit), events-dlq (looked at 0 of ~0); a scan looks at up to 10 messages a queue"
        in result.stdout
    )
    assert queue_counts(url) == (30, 0), "every message looked at is visible again"
