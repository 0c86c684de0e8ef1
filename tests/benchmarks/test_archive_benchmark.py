"""Archive and analytics figures on a million generated events (run with `make bench`).

Each figure is printed next to a baseline measured in the same run on the same machine:
compaction against a plain read+rewrite of the landing files (no dedupe, no sort); archive bytes
against the same events as JSON lines; dbt build on 1,000,000 events against dbt build on 1,000; the
analyst query over the Parquet archive in S3 against the same query over local JSON lines.
"""

import time
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import materialize

from pipeline import analyst
from pipeline.analytics import analytics_dbt_models
from pipeline.archive import COMPRESSION, compact_hour, landing_dir
from pipeline.resources import RESOURCES
from pipeline.stack import aws_client, s3_filesystem
from tests.helpers import datagen

pytestmark = pytest.mark.benchmark

EVENTS = 1_000_000
HOURS = 24
BATCHES_PER_HOUR = 8  # drain windows landing in each hour
REDELIVERED_SHARE = 0.05  # SQS at-least-once: this share of events lands twice
START = datetime(2024, 3, 4, 0, 0, tzinfo=UTC)
ANALYST_QUERY = """
    select site_id, event_type, count(*) as events, quantile_cont(epoch_ms(received_at) - epoch_ms("timestamp"), 0.95) as p95_delay_ms
    from {source}
    where event_type in ('alarm', 'door_access')
    group by all order by events desc
"""


def _seconds(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _dbt_build():
    result = materialize([analytics_dbt_models], resources={"dbt": RESOURCES["dbt"]}, raise_on_error=False)
    assert result.success
    return result


def test_archive_and_analytics_figures(aws, tmp_path, monkeypatch):
    filesystem = s3_filesystem()
    bucket = "events-archive"
    events = datagen.events_table(EVENTS, start=START, hours=HOURS)
    redelivered = events.slice(0, int(EVENTS * REDELIVERED_SHARE))
    hours = datagen.write_landing_batches(filesystem, bucket, "landing", events, batches_per_hour=BATCHES_PER_HOUR)
    datagen.write_landing_batches(filesystem, bucket, "landing", redelivered, batches_per_hour=1)
    landing_files = sum(len(filesystem.get_file_info(pa_selector(landing_dir(bucket, "landing", h)))) for h in hours)

    # Baseline: read every landing file of the hour and write it back as one file, nothing else.
    def plain_rewrite():
        for hour in hours:
            table = pa.concat_tables(
                pq.read_table(info.path, filesystem=filesystem)
                for info in filesystem.get_file_info(pa_selector(landing_dir(bucket, "landing", hour)))
            )
            pq.write_table(table, f"{bucket}/baseline/{hour}.parquet", filesystem=filesystem, compression=COMPRESSION)

    baseline_s, _ = _seconds(plain_rewrite)
    compaction_s, results = _seconds(lambda: [compact_hour(filesystem, bucket, "landing", h) for h in hours])
    landed = sum(r.landing_rows for r in results)
    archived = sum(r.archived_rows for r in results)
    assert archived == EVENTS
    archive_bytes = sum(r.bytes_written for r in results)
    archive_files = sum(len(r.files) for r in results)

    jsonl = tmp_path / "events.jsonl"
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.register("events", events)
        con.execute(
            f"""COPY (select event_id, idempotency_key, schema_version, event_type, source, site_id, device_id,
                             strftime("timestamp", '%Y-%m-%dT%H:%M:%S.%fZ') as "timestamp",
                             strftime(received_at, '%Y-%m-%dT%H:%M:%S.%fZ') as received_at,
                             json(payload) as payload from events) TO '{jsonl}' (FORMAT json)"""
        )
    jsonl_bytes = jsonl.stat().st_size

    con = analyst.connect()
    query_s, rows = _seconds(lambda: con.sql(ANALYST_QUERY.format(source=analyst.read_archive_sql(bucket))).fetchall())
    json_query_s, json_rows = _seconds(
        lambda: duckdb.sql(
            ANALYST_QUERY.format(source=f"read_json('{jsonl}', format = 'newline_delimited')")
        ).fetchall()
    )
    assert sum(r[2] for r in rows) == sum(r[2] for r in json_rows)

    datagen.write_daily_log(
        filesystem, bucket, "delivery_attempts", datagen.delivery_attempts_table(events), "attempted_at"
    )
    datagen.write_daily_log(
        filesystem, bucket, "priority_handled", datagen.priority_handled_table(events), "handled_at"
    )
    monkeypatch.setenv("DBT_DUCKDB_PATH", str(tmp_path / "analytics.duckdb"))
    dbt_s, _ = _seconds(_dbt_build)
    marts = duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True)
    assert marts.sql("select sum(events) from fct_events_hourly").fetchall() == [(EVENTS,)]
    marts.close()

    small = "events-archive-small"
    aws_client("s3").create_bucket(Bucket=small)
    small_events = datagen.events_table(1000, start=START, hours=1)
    for hour in datagen.write_landing_batches(filesystem, small, "landing", small_events):
        compact_hour(filesystem, small, "landing", hour)
    monkeypatch.setenv("DBT_ARCHIVE_ROOT", f"s3://{small}")
    monkeypatch.setenv("DBT_DUCKDB_PATH", str(tmp_path / "analytics-small.duckdb"))
    dbt_small_s, _ = _seconds(_dbt_build)

    print(
        f"""
archive benchmark ({EVENTS:,} events over {HOURS} hours, {landed - EVENTS:,} redelivered duplicates, {landing_files} landing files)
  compaction             {landed / compaction_s:>12,.0f} events/s   ({compaction_s:.1f} s; plain read+rewrite baseline {landed / baseline_s:,.0f} events/s, ratio {baseline_s / compaction_s:.2f})
  archive size           {archive_bytes / 1e6:>12.1f} MB         in {archive_files} files; JSON lines {jsonl_bytes / 1e6:.1f} MB; archive/JSON = {archive_bytes / jsonl_bytes:.3f}
  analyst query          {query_s:>12.2f} s          Parquet over s3:// (local endpoint); same query over local JSON lines {json_query_s:.2f} s (ratio {query_s / json_query_s:.2f})
  dbt build              {dbt_s:>12.1f} s          on {EVENTS:,} archived events + routing logs; on 1,000 events {dbt_small_s:.1f} s (ratio {dbt_s / dbt_small_s:.2f})
"""
    )


def pa_selector(directory):
    from pyarrow import fs

    return fs.FileSelector(directory, allow_not_found=True)
