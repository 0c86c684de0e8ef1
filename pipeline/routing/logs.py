"""The delivery-attempt and priority-handling logs: Parquet in the archive bucket, read by dbt.

The layout and columns are a contract with the archive's dbt models:
`delivery_attempts/date=YYYY-MM-DD/<unique>.parquet` and `priority_handled/date=YYYY-MM-DD/<unique>.parquet`.
"""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from datetime import datetime

import pyarrow as pa
import pyarrow.parquet as pq

TS = pa.timestamp("us", tz="UTC")

DELIVERY_ATTEMPT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("partner", pa.string()),
        ("attempt", pa.int32()),
        ("attempted_at", TS),
        ("status_code", pa.int32()),
        ("latency_ms", pa.float64()),
        ("outcome", pa.string()),  # delivered | failed | dead_lettered
        ("error", pa.string()),
        # The audit trail: what exactly was sent, under which contract (null in files older than these columns).
        ("webhook_id", pa.string()),  # the Standard Webhooks id sent: site_id/event_id
        ("site_id", pa.string()),
        ("contract_version", pa.string()),  # the partner contract the body was made under
        ("body_sha256", pa.string()),  # hex SHA-256 of the exact bytes POSTed
        ("body_bytes", pa.int64()),
        ("webhook_timestamp", TS),  # the signed webhook-timestamp header (whole seconds)
        ("archive_hour", pa.string()),  # the event's archive partition, where an audit re-reads it
    ]
)

PRIORITY_HANDLED_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("event_type", pa.string()),
        ("site_id", pa.string()),
        ("priority", pa.string()),
        ("enqueued_at", TS),
        ("handled_at", TS),
        ("latency_ms", pa.float64()),
    ]
)


def write_log(
    filesystem, bucket: str, prefix: str, schema: pa.Schema, rows: list[dict], date_column: str, tag: str = ""
) -> list[str]:
    """Write `rows` as one Parquet file per UTC date; returns the paths written."""
    by_date: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        ts: datetime = row[date_column]
        by_date[f"{ts:%Y-%m-%d}"].append(row)
    paths = []
    for date, day_rows in sorted(by_date.items()):
        table = pa.Table.from_pylist(day_rows, schema=schema)
        path = f"{bucket}/{prefix}/date={date}/{tag}{uuid.uuid4().hex}.parquet"
        pq.write_table(table, path, filesystem=filesystem, compression="zstd")
        paths.append(path)
    return paths


class AttemptLog:
    """Collects delivery attempts and writes them in small Parquet batches (thread-safe)."""

    def __init__(self, filesystem, bucket: str, tag: str = "") -> None:
        self.filesystem, self.bucket, self.tag = filesystem, bucket, tag
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self.written: list[str] = []

    def record(self, **row) -> None:
        with self._lock:
            self._rows.append(row)

    def flush(self) -> int:
        with self._lock:
            rows, self._rows = self._rows, []
        if rows:
            self.written += write_log(
                self.filesystem,
                self.bucket,
                "delivery_attempts",
                DELIVERY_ATTEMPT_SCHEMA,
                rows,
                "attempted_at",
                self.tag,
            )
        return len(rows)


def read_log(filesystem, bucket: str, prefix: str) -> pa.Table:
    """Every row of a log (tests and small reports; dbt reads it with DuckDB)."""
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset(f"{bucket}/{prefix}", filesystem=filesystem, format="parquet", partitioning="hive")
        return dataset.to_table()
    except (FileNotFoundError, OSError):
        return pa.table({})
