"""The hourly archive holds every event exactly once although SQS delivers at least once."""

import random
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
from dagster import DagsterInstance, build_sensor_context, materialize

from pipeline.archive import archive_dir, compact_hour, hour_key, read_archive_hour
from pipeline.assets import events_archive
from pipeline.jobs import drain_events_job
from pipeline.resources import RESOURCES, DrainSettings
from pipeline.sensors import archive_hours_sensor
from pipeline.stack import aws_client, s3_filesystem
from tests.conftest import sample_envelope
from tests.helpers import datagen

BASE = datetime(2024, 1, 15, 10, 0, tzinfo=UTC)
HOUR = hour_key(BASE)


def resources():
    """The code location's own resources (read from the environment the `aws` fixture sets), with short drain windows."""
    return {**RESOURCES, "drain_settings": DrainSettings(window_seconds=5)}


def send(url, envelopes):
    sqs = aws_client("sqs")
    for start in range(0, len(envelopes), 10):
        chunk = envelopes[start : start + 10]
        sqs.send_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": e.to_json()} for i, e in enumerate(chunk)]
        )


def drain(instance):
    result = drain_events_job.execute_in_process(resources=resources(), instance=instance)
    assert result.success


def compact(instance):
    result = materialize([events_archive], partition_key=HOUR, resources=resources(), instance=instance)
    assert result.success
    return result


def checks_by_name(result):
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def archived_ids():
    return read_archive_hour(s3_filesystem(), "events-archive", HOUR).column("event_id").to_pylist()


def test_events_delivered_twice_and_out_of_order_are_archived_once_and_pass_the_duplicate_check(aws):
    url = aws.provisioned.queues["events"]
    events = [sample_envelope(device_id=f"d{i}", timestamp=BASE + timedelta(seconds=37 * i)) for i in range(60)]
    redelivered = events[:]
    random.Random(5).shuffle(redelivered)
    with DagsterInstance.ephemeral() as instance:
        send(url, events)
        drain(instance)
        send(url, redelivered)  # the same events again, in another order, in a later window
        drain(instance)
        result = compact(instance)

    ids = archived_ids()
    assert sorted(ids) == sorted(e.event_id for e in events) and len(ids) == len(set(ids))
    checks = checks_by_name(result)
    assert checks["no_duplicate_event_ids"].passed and checks["reconciles_with_landing"].passed


def test_a_late_event_reopens_its_hour_and_the_archive_stays_exactly_once(aws):
    url = aws.provisioned.queues["events"]
    on_time = [sample_envelope(device_id=f"d{i}", timestamp=BASE + timedelta(minutes=i)) for i in range(20)]
    late = sample_envelope(device_id="late", timestamp=BASE + timedelta(minutes=59, seconds=59))
    with DagsterInstance.ephemeral() as instance:
        send(url, on_time)
        drain(instance)
        first = archive_hours_sensor(build_sensor_context(instance=instance, resources=resources()))
        assert [r.partition_key for r in first.run_requests] == [HOUR]
        compact(instance)

        send(url, [late, on_time[0], on_time[1]])  # the late event arrives with two redeliveries
        drain(instance)
        second = archive_hours_sensor(
            build_sensor_context(instance=instance, cursor=first.cursor, resources=resources())
        )
        assert [r.partition_key for r in second.run_requests] == [HOUR], "the late event re-opens its hour"
        assert second.run_requests[0].run_key != first.run_requests[0].run_key
        result = compact(instance)

    ids = archived_ids()
    assert sorted(ids) == sorted(e.event_id for e in on_time + [late]) and len(ids) == len(set(ids))
    assert checks_by_name(result)["no_duplicate_event_ids"].passed
    meta = result.asset_materializations_for_node("events_archive")[0].metadata
    assert meta["newly_archived"].value == 1


def test_many_landing_micro_batches_compact_into_one_file_sorted_by_event_time(aws):
    filesystem = s3_filesystem()
    table = datagen.events_table(3000, start=BASE, hours=1)
    datagen.write_landing_batches(filesystem, "events-archive", "landing", table, batches_per_hour=40)

    result = compact_hour(filesystem, "events-archive", "landing", HOUR)

    assert result.landing_files == 40 and result.archived_rows == 3000
    assert [p.rsplit("/", 1)[1] for p in result.files] == ["events_0001.parquet"]
    stamps = (
        pq.read_table(result.files[0], filesystem=filesystem, columns=["timestamp"]).column("timestamp").to_pylist()
    )
    assert stamps == sorted(stamps)


def test_recompaction_into_fewer_files_removes_the_files_of_the_earlier_compaction(aws):
    filesystem = s3_filesystem()
    datagen.write_landing_batches(
        filesystem, "events-archive", "landing", datagen.events_table(1000, start=BASE, hours=1), batches_per_hour=4
    )
    compact_hour(filesystem, "events-archive", "landing", HOUR, rows_per_file=300)

    result = compact_hour(filesystem, "events-archive", "landing", HOUR)

    assert len(result.removed_files) == 3
    listed = aws_client("s3").list_objects_v2(Bucket="events-archive", Prefix=archive_dir("", HOUR).lstrip("/"))[
        "Contents"
    ]
    assert [o["Key"].rsplit("/", 1)[1] for o in listed if o["Key"].endswith(".parquet")] == ["events_0001.parquet"]
    assert read_archive_hour(filesystem, "events-archive", HOUR).num_rows == 1000


def test_reconciliation_check_fails_when_a_landing_file_a_drain_run_reported_is_gone(aws):
    url = aws.provisioned.queues["events"]
    with DagsterInstance.ephemeral() as instance:
        send(url, [sample_envelope(device_id=f"a{i}", timestamp=BASE + timedelta(minutes=i)) for i in range(10)])
        drain(instance)
        send(url, [sample_envelope(device_id=f"b{i}", timestamp=BASE + timedelta(minutes=i)) for i in range(10)])
        drain(instance)
        s3 = aws_client("s3")
        landing = [
            o["Key"]
            for o in s3.list_objects_v2(Bucket="events-archive", Prefix="landing/")["Contents"]
            if o["Key"].endswith(".parquet")
        ]
        assert len(landing) == 2
        s3.delete_object(Bucket="events-archive", Key=landing[0])  # lost between landing and compaction
        result = compact(instance)

    check = checks_by_name(result)["reconciles_with_landing"]
    assert not check.passed
    assert check.metadata["rows_reported_by_drain_runs"].value == 20 and check.metadata["landing_rows"].value == 10


def test_archive_materialization_reports_files_written_and_archival_lag(aws):
    filesystem = s3_filesystem()
    table = datagen.events_table(500, start=BASE, hours=1)  # ingested 30 s after event time, in 2024
    datagen.write_landing_batches(filesystem, "events-archive", "landing", table, batches_per_hour=2)
    with DagsterInstance.ephemeral() as instance:
        result = compact(instance)

    meta = result.asset_materializations_for_node("events_archive")[0].metadata
    assert meta["parquet_files_written"].value == 1
    assert meta["archival_lag_minutes"].value > 60 * 24 * 365, (
        "events ingested in 2024 and archived now waited over a year"
    )
    lag = checks_by_name(result)["archival_lag"]
    assert not lag.passed and lag.severity.value == "WARN"
