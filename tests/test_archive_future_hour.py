"""Events whose device clock is off are archived, never left behind in landing: stamped ahead of the
clock, once their hour exists; stamped before the archive's first hour, under the hour they were received."""

from datetime import UTC, datetime, timedelta

from dagster import DagsterInstance, build_sensor_context, materialize

import pipeline.sensors as sensors
from edge_bridge.envelope import MAX_CLOCK_SKEW
from pipeline.archive import hour_key, parse_hour_key, read_archive_hour
from pipeline.assets import events_archive
from pipeline.jobs import drain_events_job
from pipeline.partitions import archive_hourly_partitions
from pipeline.stack import s3_filesystem
from tests.conftest import sample_envelope
from tests.test_archive_exactly_once import resources, send


def test_an_event_from_a_future_hour_is_compacted_when_that_hour_opens(aws, monkeypatch):
    now_hour = archive_hourly_partitions.get_last_partition_key()
    # As far ahead as the contract lets a clock be: received (by the forwarder) within the skew of now,
    # stamped within the skew of that, so always in an hour after the current one.
    received = datetime.now(UTC) + MAX_CLOCK_SKEW - timedelta(minutes=5)
    ahead = sample_envelope(
        device_id="fast-clock", timestamp=received + MAX_CLOCK_SKEW - timedelta(minutes=5), received_at=received
    )
    future = parse_hour_key(hour_key(ahead.timestamp))
    assert not archive_hourly_partitions.has_partition_key(hour_key(ahead.timestamp)), (
        "the event's hour is not a partition yet"
    )

    with DagsterInstance.ephemeral() as instance:
        send(aws.provisioned.queues["events"], [ahead])
        assert drain_events_job.execute_in_process(resources=resources(), instance=instance).success

        monkeypatch.setattr(sensors, "_latest_hour", lambda: now_hour)
        before = sensors.archive_hours_sensor(build_sensor_context(instance=instance, resources=resources()))
        assert not before.run_requests, "nothing to compact while the hour does not exist"

        monkeypatch.setattr(sensors, "_latest_hour", lambda: hour_key(future))  # once the event's hour has opened
        opened = sensors.archive_hours_sensor(
            build_sensor_context(instance=instance, cursor=before.cursor, resources=resources())
        )
        assert [r.partition_key for r in opened.run_requests] == [hour_key(future)]

        again = sensors.archive_hours_sensor(
            build_sensor_context(instance=instance, cursor=opened.cursor, resources=resources())
        )
        assert not again.run_requests, "an opened hour is requested once"


def test_an_event_stamped_before_the_archive_began_is_archived_under_the_hour_it_was_received(aws):
    received = datetime(2024, 3, 5, 14, 20, tzinfo=UTC)
    reset_clock = sample_envelope(
        device_id="reset-rtc", timestamp=datetime(1970, 1, 1, 0, 0, 12, tzinfo=UTC), received_at=received
    )
    assert not archive_hourly_partitions.has_partition_key(hour_key(reset_clock.timestamp)), (
        "1970 is before the first partition"
    )

    with DagsterInstance.ephemeral() as instance:
        send(aws.provisioned.queues["events"], [reset_clock])
        drained = drain_events_job.execute_in_process(resources=resources(), instance=instance)
        assert drained.success
        landed = [
            m.partition
            for m in (e.event_specific_data.materialization for e in drained.get_asset_materialization_events())
        ]
        assert landed == [hour_key(received)], "landed under the hour the edge received it"
        assert materialize(
            [events_archive], partition_key=hour_key(received), resources=resources(), instance=instance
        ).success

    archived = read_archive_hour(s3_filesystem(), "events-archive", hour_key(received))
    assert archived.column("event_id").to_pylist() == [reset_clock.event_id]
    assert archived.column("timestamp")[0].as_py() == reset_clock.timestamp, "the device's own time is kept"
