"""The cloud side of the skeleton: sensor, drain job and archive asset against the local endpoint."""

import json
from datetime import UTC, datetime, timedelta

from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context, materialize

from pipeline.archive import hour_key, read_archive_hour
from pipeline.assets import events_archive
from pipeline.jobs import drain_events_job
from pipeline.resources import ArchiveStore, DrainSettings, RoutingSettings, SQSResource
from pipeline.sensors import events_queue_sensor
from pipeline.stack import aws_client, s3_filesystem
from tests.conftest import queue_counts, sample_envelope


def resources(**drain):
    return {
        "sqs": SQSResource(events_queue="events"),
        "archive": ArchiveStore(bucket="events-archive"),
        "drain_settings": DrainSettings(window_seconds=5, **drain),
        "routing": RoutingSettings(),
    }


def send_bodies(url, bodies):
    sqs = aws_client("sqs")
    for start in range(0, len(bodies), 10):
        chunk = bodies[start : start + 10]
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(chunk)])


def test_sensor_skips_with_a_reason_when_the_queue_is_empty(aws):
    with DagsterInstance.ephemeral() as instance:
        result = events_queue_sensor(build_sensor_context(instance=instance, resources=resources()))
    assert isinstance(result, SkipReason) and "empty" in result.skip_message


def test_sensor_requests_bounded_drain_runs_when_messages_wait(aws):
    send_bodies(aws.provisioned.queues["events"], [sample_envelope().to_json() for _ in range(25)])
    with DagsterInstance.ephemeral() as instance:
        requests = events_queue_sensor(
            build_sensor_context(instance=instance, resources=resources(window_messages=10, max_concurrent_runs=2))
        )
    assert len(requests) == 2 and all(isinstance(r, RunRequest) for r in requests)


def test_drain_run_lands_unique_events_quarantines_bad_ones_and_empties_the_queue(aws):
    url = aws.provisioned.queues["events"]
    events = [sample_envelope(device_id=f"door-{i}") for i in range(30)]
    bad = ["{not json", json.dumps({**json.loads(events[0].to_json()), "schema_version": "9.0"})]
    send_bodies(url, [e.to_json() for e in events] + [events[3].to_json(), events[7].to_json()] + bad)

    result = drain_events_job.execute_in_process(resources=resources())

    assert result.success
    parsed = result.output_for_node("validate_and_dedupe")
    assert len(parsed.events) == 30 and parsed.duplicates == 2
    assert sorted(r.reason for r in parsed.quarantined) == ["bad_json", "unsupported_major"]
    assert result.output_for_node("delete_from_events_queue") == 34
    assert queue_counts(url) == (0, 0)
    quarantine = aws_client("s3").list_objects_v2(Bucket="events-archive", Prefix="quarantine/")["Contents"]
    assert len(quarantine) == 1
    landed = [e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert [e.event_specific_data.materialization.partition for e in landed] == [hour_key(events[0].timestamp)]


def test_archive_partition_holds_each_event_once_even_when_drained_twice(aws):
    url = aws.provisioned.queues["events"]
    base = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)
    events = [sample_envelope(device_id=f"d{i}", timestamp=base + timedelta(minutes=59 - i)) for i in range(20)]
    for _ in range(2):  # SQS is at-least-once: the same events arrive in two windows
        send_bodies(url, [e.to_json() for e in events])
        assert drain_events_job.execute_in_process(resources=resources()).success

    hour = hour_key(base)
    result = materialize([events_archive], partition_key=hour, resources=resources())
    assert result.success
    meta = result.asset_materializations_for_node("events_archive")[0].metadata
    assert meta["landing_rows"].value == 40 and meta["rows"].value == 20 and meta["duplicates_dropped"].value == 20

    table = read_archive_hour(s3_filesystem(), "events-archive", hour)
    assert sorted(table.column("event_id").to_pylist()) == sorted(e.event_id for e in events)
    stamps = table.column("timestamp").to_pylist()
    assert stamps == sorted(stamps), "archive files are sorted by event time"
