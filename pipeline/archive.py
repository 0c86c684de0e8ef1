"""The Parquet archive: landing micro-batches and hourly compaction into the analysts' layout.

Layout in the archive bucket:
    landing/hour=YYYY-MM-DDTHH/<batch_id>.parquet            written by drain runs (at-least-once)
    year=YYYY/month=MM/day=DD/hour=HH/events_NNNN.parquet     written by hourly compaction

An hour's archive files are a pure function of that hour's landing files: compaction reads them all,
keeps the first copy of each (site_id, event_id) (an event id is unique only within its site), sorts by
event time and rewrites the hour. Re-running it (for
late events, or twice by accident) therefore still leaves every event exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs

from edge_bridge.envelope import SUPPORTED_MAJORS, Envelope, utc_now
from pipeline.partitions import ARCHIVE_START

TS = pa.timestamp("us", tz="UTC")
ARCHIVE_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("idempotency_key", pa.string()),
        ("schema_version", pa.string()),
        ("event_type", pa.string()),
        ("source", pa.string()),
        ("site_id", pa.string()),
        ("device_id", pa.string()),
        ("timestamp", TS),
        ("received_at", TS),
        # When SQS accepted the edge's send (its SentTimestamp; null in files landed before the column
        # existed): queued_at - received_at is the time an event spent inside the site.
        ("queued_at", TS),
        ("ingested_at", TS),  # when a drain run took it from SQS
        ("payload", pa.string()),  # the payload object as JSON text; DuckDB reads it with json functions
    ]
)
# The archive's columns before queued_at: an hour compacted then and not since still reads (queued_at null).
LEGACY_ARCHIVE_SCHEMA = ARCHIVE_SCHEMA.remove(ARCHIVE_SCHEMA.get_field_index("queued_at"))
ROWS_PER_FILE = 1_000_000
ROW_GROUP_ROWS = 128 * 1024
COMPRESSION = "zstd"


def hour_key(ts: datetime) -> str:
    """The hourly partition key, in Dagster's HourlyPartitionsDefinition format."""
    return ts.astimezone(UTC).strftime("%Y-%m-%d-%H:00")


def archive_hour(timestamp: datetime, received_at: datetime) -> str:
    """The hour an event is archived under: the hour of its event time.

    A device clock can put an event before the archive's first hour (a reset clock reads 1970), where
    no partition exists: such an event is filed under the hour the edge received it (the gateway's clock,
    kept by NTP) so that it is archived, not left in landing. Its row keeps both times as they were.
    """
    if timestamp >= ARCHIVE_START:
        return hour_key(timestamp)
    return hour_key(max(received_at, ARCHIVE_START))


def parse_hour_key(key: str) -> datetime:
    return datetime.strptime(key, "%Y-%m-%d-%H:%M").replace(tzinfo=UTC)


def landing_dir(bucket: str, landing_prefix: str, hour: str) -> str:
    return f"{bucket}/{landing_prefix}/hour={parse_hour_key(hour):%Y-%m-%dT%H}"


def archive_dir(bucket: str, hour: str) -> str:
    return f"{bucket}/{parse_hour_key(hour):year=%Y/month=%m/day=%d/hour=%H}"


def _row(env: Envelope, ingested_at: datetime, queued_at: datetime | None = None) -> tuple:
    return (
        env.event_id,
        env.idempotency_key,
        env.schema_version,
        env.event_type,
        env.source,
        env.site_id,
        env.device_id,
        env.timestamp,
        env.received_at,
        queued_at,
        ingested_at,
        json.dumps(env.payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False),
    )


def _table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[] for _ in ARCHIVE_SCHEMA.names]
    return pa.table({name: list(values) for name, values in zip(ARCHIVE_SCHEMA.names, columns)}, schema=ARCHIVE_SCHEMA)


def envelopes_to_table(
    envelopes: Iterable[Envelope],
    ingested_at: datetime,
    on_refused: Callable[[Envelope, Exception], None] | None = None,
    queued_at: Sequence[datetime | None] | None = None,
) -> pa.Table:
    """Archive rows; an event that cannot be made into a row goes to `on_refused` (raises without one).

    `queued_at`, one per envelope, is when SQS accepted each from the edge (None where unknown).
    The whole batch is converted at once; only if that fails is each event converted alone, to find
    the one (or ones) at fault, so the common case costs nothing extra.
    """
    envelopes = list(envelopes)
    queued = list(queued_at) if queued_at is not None else [None] * len(envelopes)
    try:
        return _table([_row(env, ingested_at, q) for env, q in zip(envelopes, queued)])
    except Exception:
        if on_refused is None:
            raise
    rows = []
    for env, q in zip(envelopes, queued):
        try:
            row = _row(env, ingested_at, q)
            _table([row])
        except Exception as exc:  # noqa: BLE001 - this event's fate alone
            on_refused(env, exc)
            continue
        rows.append(row)
    return _table(rows)


def write_landing(
    filesystem: fs.FileSystem,
    bucket: str,
    landing_prefix: str,
    envelopes: list[Envelope],
    batch_id: str,
    ingested_at: datetime,
    on_refused: Callable[[Envelope, Exception], None] | None = None,
    queued_at: Sequence[datetime | None] | None = None,
) -> dict[str, int]:
    """Write one landing file per event-hour in this batch; returns {hour_key: rows}.

    `batch_id` must be unique per attempt at a window (a re-delivered window writes a new file and
    compaction removes the duplicates). `queued_at`, one per envelope, is when SQS accepted each from
    the edge. An event that cannot be made into a row goes to `on_refused` (for the caller to
    quarantine); a write that fails raises.
    """
    queued = list(queued_at) if queued_at is not None else [None] * len(envelopes)
    by_hour: dict[str, list[tuple[Envelope, datetime | None]]] = {}
    for env, q in zip(envelopes, queued):
        by_hour.setdefault(archive_hour(env.timestamp, env.received_at), []).append((env, q))
    written = {}
    for hour, pairs in sorted(by_hour.items()):
        table = envelopes_to_table([env for env, _ in pairs], ingested_at, on_refused, [q for _, q in pairs])
        if not table.num_rows:
            continue
        directory = landing_dir(bucket, landing_prefix, hour)
        filesystem.create_dir(directory, recursive=True)
        pq.write_table(table, f"{directory}/{batch_id}.parquet", filesystem=filesystem, compression=COMPRESSION)
        written[hour] = table.num_rows
    return written


def landing_has_files(s3_client, bucket: str, landing_prefix: str, hour: str) -> bool:
    """One cheap listing call: has anything landed for `hour`? (Sensors may afford this, not a scan.)"""
    prefix = landing_dir(bucket, landing_prefix, hour).split("/", 1)[1] + "/"
    return s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0


def _list_parquet(filesystem: fs.FileSystem, directory: str) -> list[str]:
    selector = fs.FileSelector(directory, allow_not_found=True, recursive=False)
    return sorted(info.path for info in filesystem.get_file_info(selector) if info.path.endswith(".parquet"))


def read_landing(filesystem: fs.FileSystem, bucket: str, landing_prefix: str, hour: str) -> tuple[pa.Table, int]:
    """Every landing file of `hour` in ARCHIVE_SCHEMA; a column an older file lacks (queued_at) reads as null."""
    files = _list_parquet(filesystem, landing_dir(bucket, landing_prefix, hour))
    if not files:
        return ARCHIVE_SCHEMA.empty_table(), 0
    tables = [pq.read_table(path, filesystem=filesystem, schema=ARCHIVE_SCHEMA) for path in files]
    return pa.concat_tables(tables), len(files)


def event_keys(table: pa.Table) -> pa.Array:
    """Each row's identity as one string, `site_id/event_id` (as `Envelope.dedupe_id`): an event id is
    only unique within its site, so one site's ids can never shadow another's."""
    if table.num_rows == 0:
        return pa.array([], pa.string())
    return pc.binary_join_element_wise(table.column("site_id"), table.column("event_id"), "/").combine_chunks()


def dedupe_by_event_key(table: pa.Table) -> pa.Table:
    """Keep one row per (site_id, event_id): the earliest ingested copy (ties: the first seen)."""
    if table.num_rows == 0:
        return table
    indexed = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    ordered = indexed.sort_by(
        [("site_id", "ascending"), ("event_id", "ascending"), ("ingested_at", "ascending"), ("_row", "ascending")]
    )
    keys = event_keys(ordered)
    keep = pc.not_equal(keys[1:], keys[:-1])
    mask = pa.concat_arrays([pa.array([True]), keep.fill_null(True)])
    return ordered.filter(mask).drop_columns(["_row"])


@dataclass
class CompactionResult:
    hour: str
    landing_files: int
    landing_rows: int
    archived_rows: int
    files: list[str]
    removed_files: list[str]
    bytes_written: int
    newly_archived: int = 0
    archival_lag_minutes: float = 0.0
    archived_keys: pa.Array | None = None  # `site_id/event_id` of every archived row

    @property
    def duplicates_dropped(self) -> int:
        return self.landing_rows - self.archived_rows


def _archived_keys(filesystem: fs.FileSystem, paths: list[str]) -> pa.Array:
    if not paths:
        return pa.array([], pa.string())
    return event_keys(
        pa.concat_tables([pq.read_table(p, columns=["site_id", "event_id"], filesystem=filesystem) for p in paths])
    )


def archival_lag_minutes(unique: pa.Table, previously_archived: pa.Array, archived_at: datetime) -> tuple[int, float]:
    """How long the oldest newly archived event waited between leaving SQS and reaching the archive.

    `previously_archived` holds the keys (`event_keys`) already in the hour. Returns (newly archived
    events, lag in minutes); a re-run that adds nothing has no lag.
    """
    new = unique.filter(pc.invert(pc.is_in(event_keys(unique), value_set=previously_archived)))
    if new.num_rows == 0:
        return 0, 0.0
    oldest = pc.min(new.column("ingested_at")).as_py()
    return new.num_rows, max(0.0, (archived_at - oldest).total_seconds() / 60)


def compact_hour(
    filesystem: fs.FileSystem, bucket: str, landing_prefix: str, hour: str, rows_per_file: int = ROWS_PER_FILE
) -> CompactionResult:
    """Rewrite one hour of the archive from all of its landing files, each (site_id, event_id) once.

    Files are written as events_0001.parquet, events_0002.parquet, ... of at most `rows_per_file`
    rows (so an hour is usually one file of analytics-friendly size), then files of an earlier, larger
    compaction are removed. Each S3 PUT replaces a whole object, so readers never see half a file.
    """
    landed, n_files = read_landing(filesystem, bucket, landing_prefix, hour)
    unique = dedupe_by_event_key(landed).sort_by(
        [("timestamp", "ascending"), ("site_id", "ascending"), ("event_id", "ascending")]
    )
    directory = archive_dir(bucket, hour)
    before = _list_parquet(filesystem, directory)
    previously = _archived_keys(filesystem, before)
    written, total_bytes = [], 0
    if unique.num_rows:
        filesystem.create_dir(directory, recursive=True)
    for n, start in enumerate(range(0, unique.num_rows, rows_per_file), start=1):
        path = f"{directory}/events_{n:04d}.parquet"
        pq.write_table(
            unique.slice(start, rows_per_file),
            path,
            filesystem=filesystem,
            compression=COMPRESSION,
            row_group_size=ROW_GROUP_ROWS,
        )
        written.append(path)
        total_bytes += filesystem.get_file_info(path).size
    stale = sorted(set(before) - set(written))
    for path in stale:
        filesystem.delete_file(path)
    newly, lag = archival_lag_minutes(unique, previously, utc_now())
    return CompactionResult(
        hour, n_files, landed.num_rows, unique.num_rows, written, stale, total_bytes, newly, lag, event_keys(unique)
    )


@dataclass
class HourAudit:
    """What the archive of one hour actually holds, read back from S3 after compaction."""

    hour: str
    rows: int
    distinct_events: int  # distinct (site_id, event_id)
    missing_events: int  # expected (unique landed) but not archived
    unexpected_events: int  # archived but not among the unique landed events
    schema_problems: list[str]
    versions: dict[str, int]

    @property
    def duplicates(self) -> int:
        return self.rows - self.distinct_events

    @property
    def unsupported_versions(self) -> list[str]:
        return sorted(v for v in self.versions if not _supported_version(v))


def _supported_version(version: str) -> bool:
    major, _, _ = (version or "").partition(".")
    return major.isdigit() and int(major) in SUPPORTED_MAJORS


def audit_hour(filesystem: fs.FileSystem, bucket: str, hour: str, expected_keys: pa.Array | None = None) -> HourAudit:
    """Read an archive hour back and compare it with what compaction meant to write (`expected_keys`:
    `event_keys` of the unique landed events)."""
    paths = _list_parquet(filesystem, archive_dir(bucket, hour))
    problems = []
    tables = []
    for path in paths:
        schema = pq.read_schema(path, filesystem=filesystem)
        if not schema.remove_metadata().equals(ARCHIVE_SCHEMA) and not schema.remove_metadata().equals(
            LEGACY_ARCHIVE_SCHEMA
        ):
            problems.append(f"{path}: schema differs from ARCHIVE_SCHEMA: {schema.remove_metadata()}")
            continue
        tables.append(pq.read_table(path, columns=["site_id", "event_id", "schema_version"], filesystem=filesystem))
    empty = pa.table({name: pa.array([], pa.string()) for name in ("site_id", "event_id", "schema_version")})
    table = pa.concat_tables(tables) if tables else empty
    distinct = pc.unique(event_keys(table))
    missing = unexpected = 0
    if expected_keys is not None:
        missing = int(pc.sum(pc.invert(pc.is_in(expected_keys, value_set=distinct))).as_py() or 0)
        unexpected = int(pc.sum(pc.invert(pc.is_in(distinct, value_set=expected_keys))).as_py() or 0)
    counts = pc.value_counts(table.column("schema_version").combine_chunks())
    versions = {row["values"]: row["counts"] for row in counts.to_pylist()}
    return HourAudit(hour, table.num_rows, len(distinct), missing, unexpected, problems, versions)


def read_archive_hour(filesystem: fs.FileSystem, bucket: str, hour: str) -> pa.Table:
    files = _list_parquet(filesystem, archive_dir(bucket, hour))
    if not files:
        return ARCHIVE_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, filesystem=filesystem, schema=ARCHIVE_SCHEMA) for p in files])
