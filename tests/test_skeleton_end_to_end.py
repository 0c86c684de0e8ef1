"""One device event travels from Mosquitto through the edge service and SQS into the Parquet archive."""

import json

import duckdb
from dagster import materialize

from pipeline.archive import archive_dir, hour_key
from pipeline.assets import events_archive
from pipeline.jobs import drain_events_job
from tests.conftest import publish, queue_counts, sample_envelope, wait_until
from tests.test_drain_and_archive import resources as pipeline_resources


def test_device_event_reaches_the_parquet_archive_with_every_field_intact(edge_factory, mosquitto, aws, tmp_path):
    edge_factory()
    env = sample_envelope()
    publish(mosquitto.port, "sites/site-123/events/ajax/door_access", [env.to_json()])

    events_url = aws.provisioned.queues["events"]
    wait_until(lambda: queue_counts(events_url)[0] == 1, 20, message="the event in SQS")

    result = drain_events_job.execute_in_process(resources=pipeline_resources())
    assert result.success
    assert queue_counts(events_url) == (0, 0), "the drain run must delete what it archived"

    hour = hour_key(env.timestamp)
    archived = materialize([events_archive], partition_key=hour, resources=pipeline_resources())
    assert archived.success

    # Read back what an analyst would read: the Parquet files, with DuckDB.
    from pipeline.stack import s3_filesystem

    filesystem = s3_filesystem()
    directory = archive_dir("events-archive", hour)
    files = [i.path for i in filesystem.get_file_info(__import__("pyarrow.fs").fs.FileSelector(directory))]
    assert [f.rsplit("/", 1)[1] for f in files] == ["events_0001.parquet"]
    local = tmp_path / "events_0001.parquet"
    with filesystem.open_input_file(files[0]) as src:
        local.write_bytes(src.read())
    rows = duckdb.sql(
        f"select schema_version, event_id, idempotency_key, event_type, source, site_id, device_id, "
        f"strftime(timestamp at time zone 'UTC', '%Y-%m-%dT%H:%M:%SZ'), received_at, payload from '{local}'"
    ).fetchall()
    assert len(rows) == 1
    row = rows[0]
    assert row[:8] == (
        env.schema_version,
        env.event_id,
        env.idempotency_key,
        env.event_type,
        env.source,
        env.site_id,
        env.device_id,
        "2024-01-15T10:30:00Z",
    )
    assert row[8] == env.received_at
    assert json.loads(row[9]) == env.payload
