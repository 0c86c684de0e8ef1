"""Events stamped ahead of the clock are archived once their hour exists, not left behind in landing."""

from datetime import timedelta

from dagster import DagsterInstance, build_sensor_context

import pipeline.sensors as sensors
from pipeline.archive import hour_key, parse_hour_key
from pipeline.jobs import drain_events_job
from pipeline.partitions import archive_hourly_partitions
from tests.conftest import sample_envelope
from tests.test_archive_exactly_once import resources, send


def test_an_event_from_a_future_hour_is_compacted_when_that_hour_opens(aws, monkeypatch):
    now_hour = archive_hourly_partitions.get_last_partition_key()
    future = parse_hour_key(now_hour) + timedelta(hours=3)
    ahead = sample_envelope(device_id="fast-clock", timestamp=future + timedelta(minutes=5))
    assert not archive_hourly_partitions.has_partition_key(hour_key(ahead.timestamp)), "the event's hour is not a partition yet"

    with DagsterInstance.ephemeral() as instance:
        send(aws.provisioned.queues["events"], [ahead])
        assert drain_events_job.execute_in_process(resources=resources(), instance=instance).success

        monkeypatch.setattr(sensors, "_latest_hour", lambda: now_hour)
        before = sensors.archive_hours_sensor(build_sensor_context(instance=instance, resources=resources()))
        assert not before.run_requests, "nothing to compact while the hour does not exist"

        monkeypatch.setattr(sensors, "_latest_hour", lambda: hour_key(future))  # three hours later
        opened = sensors.archive_hours_sensor(build_sensor_context(instance=instance, cursor=before.cursor, resources=resources()))
        assert [r.partition_key for r in opened.run_requests] == [hour_key(future)]

        again = sensors.archive_hours_sensor(build_sensor_context(instance=instance, cursor=opened.cursor, resources=resources()))
        assert not again.run_requests, "an opened hour is requested once"
