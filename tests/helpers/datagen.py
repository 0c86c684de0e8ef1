"""Generated data in the archive's shapes, made by DuckDB in bulk (a million rows in seconds).

Deterministic: every random-looking value is a hash of the row number and a seed, except event_id
(a fresh UUIDv7 per row, as the edge makes them).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs

from pipeline.archive import ARCHIVE_SCHEMA, COMPRESSION, hour_key, landing_dir

START = datetime(2024, 3, 4, 0, 0, tzinfo=UTC)
EVENT_TYPES = ["door_access", "motion", "alarm", "temperature", "camera_clip", "battery_low"]
SOURCES = ["ajax", "zigbee", "nvr", "idp"]
PARTNERS = ["acme-security", "northwind-insurance", "contoso-facilities"]

DELIVERY_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("partner", pa.string()),
        ("attempt", pa.int32()),
        ("attempted_at", pa.timestamp("us", tz="UTC")),
        ("status_code", pa.int32()),
        ("latency_ms", pa.float64()),
        ("outcome", pa.string()),
        ("error", pa.string()),
    ]
)
PRIORITY_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("event_type", pa.string()),
        ("site_id", pa.string()),
        ("priority", pa.string()),
        ("enqueued_at", pa.timestamp("us", tz="UTC")),
        ("handled_at", pa.timestamp("us", tz="UTC")),
        ("latency_ms", pa.float64()),
    ]
)


def _duck() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    return con


def _list(values: list[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def events_table(
    n: int,
    start: datetime = START,
    hours: int = 24,
    sites: int = 20,
    devices_per_site: int = 25,
    outage_site: str | None = "site-003",
    seed: int = 1,
) -> pa.Table:
    """`n` events spread over `hours` hours from `start`, in ARCHIVE_SCHEMA.

    The device's delay to the forwarder (received_at - timestamp) is under 2 s; edge buffering
    (queued_at - received_at) is under 0.5 s, except for `outage_site`, whose events in the second
    hour reach SQS 20-40 minutes after the edge received them (a retry-log backlog replayed after a cut).
    """
    sql = f"""
    with base as (
        select i,
               'site-' || lpad(cast(hash(i, {seed}, 'site') % {sites} as varchar), 3, '0') as site_id,
               hash(i, {seed}, 'dev') % {devices_per_site} as dev,
               {_list(EVENT_TYPES)}[1 + cast(hash(i, {seed}, 'type') % {len(EVENT_TYPES)} as bigint)] as event_type,
               timestamptz '{start.isoformat()}' + to_microseconds(cast(hash(i, {seed}, 'ts') % ({hours} * 3600000000) as bigint)) as ts
        from range({n}) t(i)
    ),
    received as (
        select *, ts + to_microseconds(cast(hash(i, {seed}, 'delay') % 2000000 as bigint)) as received_at from base
    ),
    timed as (
        select *,
               received_at + case when site_id = '{outage_site}' and ts >= timestamptz '{(start + timedelta(hours=1)).isoformat()}'
                                                                 and ts < timestamptz '{(start + timedelta(hours=2)).isoformat()}'
                                  then to_microseconds(cast(1200000000 + hash(i, {seed}, 'late') % 1200000000 as bigint))
                                  else to_microseconds(cast(hash(i, {seed}, 'queue') % 500000 as bigint)) end as queued_at
        from received
    )
    select cast(uuidv7() as varchar) as event_id,
           site_id || '-' || event_type || '-dev-' || dev || '-' || strftime(ts, '%Y-%m-%dT%H:%M:%S.%fZ') as idempotency_key,
           '1.0' as schema_version,
           event_type,
           {_list(SOURCES)}[1 + cast(hash(site_id, dev) % {len(SOURCES)} as bigint)] as source,
           site_id,
           'dev-' || dev as device_id,
           ts as "timestamp",
           received_at,
           queued_at,
           queued_at + interval 30 second as ingested_at,
           '{{"zone":' || (hash(i, 'zone') % 16) || ',"value":' || (hash(i, 'v') % 1000) || '}}' as payload
    from timed
    """
    with _duck() as con:
        return con.sql(sql).to_arrow_table().cast(ARCHIVE_SCHEMA)


def write_landing_batches(
    filesystem: fs.FileSystem, bucket: str, landing_prefix: str, table: pa.Table, batches_per_hour: int = 1
) -> list[str]:
    """Write `table` as drain runs would: per event hour, `batches_per_hour` landing files. Returns the hours."""
    hours = sorted(
        set(hour_key(ts) for ts in pc.unique(pc.floor_temporal(table.column("timestamp"), unit="hour")).to_pylist())
    )
    for hour in hours:
        start = datetime.strptime(hour, "%Y-%m-%d-%H:%M").replace(tzinfo=UTC)
        in_hour = table.filter(
            pc.and_(
                pc.greater_equal(table.column("timestamp"), pa.scalar(start, ARCHIVE_SCHEMA.field("timestamp").type)),
                pc.less(
                    table.column("timestamp"),
                    pa.scalar(start + timedelta(hours=1), ARCHIVE_SCHEMA.field("timestamp").type),
                ),
            )
        )
        directory = landing_dir(bucket, landing_prefix, hour)
        filesystem.create_dir(directory, recursive=True)
        size = -(-in_hour.num_rows // batches_per_hour)
        for b in range(batches_per_hour):
            chunk = in_hour.slice(b * size, size)
            if chunk.num_rows:
                pq.write_table(
                    chunk, f"{directory}/{uuid.uuid4().hex}.parquet", filesystem=filesystem, compression=COMPRESSION
                )
    return hours


def delivery_attempts_table(events: pa.Table, share: float = 0.3, seed: int = 2) -> pa.Table:
    """Partner delivery attempts for a share of `events`: most delivered first time, some retried, a few dead-lettered."""
    with _duck() as con:
        con.register("events", events)
        table = con.sql(
            f"""
            with picked as (
                select event_id, "timestamp" as ts,
                       {_list(PARTNERS)}[1 + cast(hash(event_id, {seed}, 'p') % {len(PARTNERS)} as bigint)] as partner,
                       hash(event_id, {seed}, 'fate') % 100 as fate
                from events where hash(event_id, {seed}) % 1000 < {int(share * 1000)}
            ),
            attempts as (
                select p.*, a.attempt from picked p,
                       range(1, case when fate < 85 then 2 when fate < 97 then 3 else 7 end) a(attempt)
            )
            select event_id, partner, cast(attempt as int) as attempt,
                   ts + to_seconds(cast([0, 1, 5, 15, 60, 300][cast(attempt as bigint)] + 2 as bigint)) as attempted_at,
                   cast(case when fate < 85 or (fate < 97 and attempt = 2) then 200 when fate >= 99 then null else 503 end as int) as status_code,
                   cast(20 + hash(event_id, attempt) % 400 as double) as latency_ms,
                   case when fate < 85 or (fate < 97 and attempt = 2) then 'delivered'
                        when fate >= 97 and attempt = 6 then 'dead_lettered' else 'failed' end as outcome,
                   case when fate < 85 or (fate < 97 and attempt = 2) then null else 'HTTP 503 or timeout' end as error
            from attempts
            """
        ).to_arrow_table()
    return table.cast(DELIVERY_SCHEMA)


def priority_handled_table(events: pa.Table, seed: int = 3) -> pa.Table:
    """Every event handled by a priority consumer: alarms high, door access medium, the rest low."""
    with _duck() as con:
        con.register("events", events)
        table = con.sql(
            f"""
            select event_id, event_type, site_id,
                   case when event_type in ('alarm', 'camera_clip') then 'high'
                        when event_type in ('door_access', 'battery_low') then 'medium' else 'low' end as priority,
                   received_at + interval 1 second as enqueued_at,
                   received_at + interval 1 second + to_microseconds(cast(hash(event_id, {seed}) % 3000000 as bigint)) as handled_at,
                   (hash(event_id, {seed}) % 3000000) / 1000.0 as latency_ms
            from events
            """
        ).to_arrow_table()
    return table.cast(PRIORITY_SCHEMA)


def write_daily_log(filesystem: fs.FileSystem, bucket: str, name: str, table: pa.Table, time_column: str) -> list[str]:
    """Write a routing log as `<name>/date=YYYY-MM-DD/<unique>.parquet`, one file per day."""
    days = pc.strftime(table.column(time_column), format="%Y-%m-%d")
    paths = []
    for day in sorted(set(days.to_pylist())):
        directory = f"{bucket}/{name}/date={day}"
        filesystem.create_dir(directory, recursive=True)
        path = f"{directory}/{uuid.uuid4().hex}.parquet"
        pq.write_table(table.filter(pc.equal(days, day)), path, filesystem=filesystem, compression=COMPRESSION)
        paths.append(path)
    return paths
